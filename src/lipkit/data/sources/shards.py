"""WebDataset tar shards: reading (streamed, never unpacked) and counting (writing: data/shard_writer.py).

Layout (img2dataset's): consecutive tar members share a key, `key.jpg|png|webp|...` is the image,
`key.txt` one caption and/or `key.json` an object with the captions (`captions`, `caption`, `text`
or data.caption_column: a string or a list) and any metadata; a `key` field in the JSON names the
sample (lipkit writes the source's key there), else the tar key does. A clip (data/frames.py) has a
video member (`key.mp4`, `.webm`, `.mkv`, `.avi`, `.mov`, `.m4v`) or numbered frames (`key.0000.jpg`,
`key.0001.jpg`, …) instead of the image. Shards are named by a brace pattern (`shards/{00000..00099}.tar`),
a list of `.tar` paths, a folder, or `pipe:` URLs (any command that writes a tar to stdout); `webdataset`
opens them and groups members into samples.

Damage is reported, never fatal: a shard that cannot be opened, ends in the middle of a member
(truncated download) or has a damaged header or trailing garbage (where `tarfile` would silently stop)
yields the samples before the damage and then a `Skip` naming the shard.

Sample counts are what an epoch needs before it starts (the length of the learning-rate schedule):
`shard_counts` reads them from `lipkit-counts.json` beside the shards (written by `lipkit data convert`),
counts the shards that are missing there or changed since (member headers only: no image is read),
and writes the file back (or into the user cache when the folder is read-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipkit.atomic import write_text_atomic
from lipkit.data.frames import Frames, check_frame_settings, shard_frames
from lipkit.data.image_policy import IMAGE_EXTS
from lipkit.data.records import Record, Skip, caption_record, parse_captions, parse_json_meta
from lipkit.errors import UserError

COUNTS_FILE = "lipkit-counts.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _is_pattern(src: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", src))


def names_shards(src: str) -> bool:
    """A pipe: URL, a brace pattern or a .tar file, by its name alone (any URL scheme webdataset opens)."""
    low = src.lower()
    return low.startswith("pipe:") or _is_pattern(src) or low.endswith(SHARD_SUFFIXES)


def holds_shards(folder: Path) -> bool:
    return any(next(folder.glob(f"*{suf}"), None) is not None for suf in SHARD_SUFFIXES)


def known_count(src: str | Path) -> int | None:
    """Samples in all shards when every shard's count is cached, else None (counting reads headers)."""
    urls = expand_shards(src)
    counts = cached_counts(urls)
    return sum(counts.values()) if len(counts) == len(urls) else None


def webdataset_module() -> Any:
    try:
        import webdataset
    except ImportError as e:
        raise UserError(
            "Reading WebDataset shards needs the webdataset package; install it with `pip install webdataset`."
        ) from e
    return webdataset


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url or url.startswith("file:")


def _local_path(url: str) -> Path:
    return Path(url[5:].lstrip("/") if url.startswith("file://") else url.removeprefix("file:")).expanduser()


def expand_shards(src: str | Path) -> list[str]:
    """Shard URLs of a brace pattern (`a/{000..009}.tar`), several patterns joined by '::', a folder
    of `.tar` files, or a single path / pipe: URL."""
    import braceexpand

    urls: list[str] = []
    for part in str(src).split("::"):
        p = Path(part).expanduser()
        if not part.startswith("pipe:") and p.is_dir():
            urls += sorted(str(f) for f in p.iterdir() if f.name.lower().endswith(SHARD_SUFFIXES))
        else:
            urls += [str(Path(u).expanduser()) if is_local(u) else u for u in braceexpand.braceexpand(part)]
    if not urls:
        raise UserError(f"'{src}' names no shards; use a pattern such as shards/{{00000..00099}}.tar.")
    local = [u for u in urls if is_local(u)]
    if local and not any(_local_path(u).is_file() for u in local):
        raise UserError(
            f"None of the {len(urls)} shards of '{src}' exists (first: {urls[0]}); check the path or "
            "pattern, or write shards with `lipkit data convert`."
        )
    return urls


def shard_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


# -- reading -------------------------------------------------------------------------------------


@dataclass
class ShardStatus:
    """What happened while reading one shard: `reason` is empty when it was read to its proper end."""

    url: str
    reason: str = ""
    detail: str = ""
    samples: int = 0  # grouped samples delivered

    def skip(self, expected: int | None = None) -> Skip:
        lost = max(1, (expected or 0) - self.samples)
        return Skip(self.reason, shard_name(self.url), self.detail, count=lost)


def _members(url: str, status: ShardStatus) -> Iterator[dict[str, Any]]:
    """Regular tar members as webdataset file samples {fname, data, __url__}."""
    wds = webdataset_module()
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - gopen raises whatever the opener raises
        status.reason, status.detail = "unreadable_shard", f"{type(e).__name__}: {e}"[:200]
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if base.startswith("__") and base.endswith("__"):
                    continue  # webdataset metadata members
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                tar.members = []  # streaming: keep no index
                yield {"fname": info.name, "data": data, "__url__": url}
            # tarfile ends quietly at a cut or damaged header: the last block it read must be a whole
            # (zero) block, and whatever follows it zero padding
            if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:  # type: ignore[union-attr]
                status.reason, status.detail = (
                    "truncated_shard",
                    "the file ends without an end-of-archive block",
                )
            while not status.reason and (chunk := tar.fileobj.read(1 << 20)):  # type: ignore[union-attr]
                if chunk.strip(b"\0"):
                    status.reason, status.detail = "corrupt_shard", "a damaged header or data after the end"
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        text = str(e)
        truncated = isinstance(e, EOFError) or "unexpected end" in text or "empty file" in text
        status.reason = "truncated_shard" if truncated else "corrupt_shard"
        status.detail = f"{type(e).__name__}: {text}"[:200]
    finally:
        with contextlib.suppress(Exception):  # a pipe's exit status: the read error above says enough
            stream.close()


def read_shard(url: str, status: ShardStatus) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: dicts {__key__, __url__, ext: bytes, ...} in tar order; damage is
    recorded in `status` (after the last sample)."""
    wds = webdataset_module()

    def keep_going(exn: Exception) -> bool:  # a duplicate member: the first one wins
        return True

    for sample in wds.tariterators.group_by_keys(_members(url, status), handler=keep_going):
        status.samples += 1
        yield sample


def parse_sample(sample: dict[str, Any], caption_column: str = "captions") -> Record | Skip:
    """A raw shard sample as a Record (image bytes, not decoded) or a Skip."""
    key = str(sample.get("__key__", ""))
    meta: dict[str, Any] = {}
    captions: Any = None
    if "json" in sample:
        parsed = parse_json_meta(sample["json"], caption_column)
        if isinstance(parsed, Skip):
            return Skip(parsed.reason, key, parsed.detail)
        captions, meta = parsed
        key = str(meta.pop("key", "") or key)
    if captions is None and "txt" in sample:
        captions = sample["txt"]
    clip = shard_frames(sample)  # a video member or numbered frames (data/frames.py)
    if isinstance(clip, str):
        return Skip("no_frames", key, clip)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None and clip is None:
        return Skip("no_image", key, f"no {'/'.join(IMAGE_EXTS[:4])} member, video or numbered frames")
    if captions is None:
        return Skip("no_caption", key, "no .txt or .json caption")
    first = sample[ext] if ext else clip.video if clip.video is not None else clip.items[0]  # type: ignore[union-attr]
    record = caption_record(Path(str(sample.get("__url__", ""))), captions, meta, key, data=first)
    if isinstance(record, Record):
        record.frames = clip
    return record


def holds_clips(url: str) -> bool:
    """Whether the shard's first sample is a clip (a video member or numbered frames)."""
    with contextlib.closing(read_shard(url, ShardStatus(url))) as samples:
        sample = next(samples, None)
    return sample is not None and isinstance(shard_frames(sample), (Frames, str))


def clip_settings(url: str, count: int, sampling: str) -> tuple[int, str] | None:
    """(data.num_frames, data.frame_sampling) for shards whose first shard (`url`) starts with a clip (then
    every sample must be one), else None: single images."""
    if not holds_clips(url):
        return None
    check_frame_settings(count, sampling)
    return count, sampling


def scan_shards(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every sample of every shard in order, then a Skip for each damaged shard (the image is the
    first member with an image extension: image_column and image_root do not apply)."""
    urls = expand_shards(src)
    known = cached_counts(urls)
    for url in urls:
        status = ShardStatus(url)
        for sample in read_shard(url, status):
            yield parse_sample(sample, caption_column)
        if status.reason:
            yield status.skip(known.get(url))


def shard_captions(
    urls: Iterable[str], caption_column: str = "captions", extra_columns: Sequence[str] = ()
) -> Iterator[str]:
    """Every caption of the shards (and of the JSON columns `extra_columns`: data.caption_mix's other
    sources), for training a tokenizer; local .tar files are read by member headers and text members
    only (no image is read), damaged shards simply end early."""
    for url in urls:
        path = _local_path(url)
        if not (is_local(url) and url.lower().endswith(".tar") and path.is_file()):
            for sample in read_shard(url, ShardStatus(url)):
                yield from _text_captions(sample, caption_column, extra_columns)
            continue
        from webdataset.tariterators import base_plus_ext

        current: dict[str, Any] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    prefix, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
                    if prefix is None:
                        continue
                    if current and prefix != current["__key__"]:
                        yield from _text_captions(current, caption_column, extra_columns)
                        current = {}
                    current["__key__"] = prefix
                    if ext.lower() in ("txt", "json"):
                        current[ext.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError):
            pass
        yield from _text_captions(current, caption_column, extra_columns)


def _text_captions(sample: dict[str, Any], caption_column: str, extra: Sequence[str] = ()) -> list[str]:
    parsed = parse_sample({**sample, "png": b""}, caption_column)  # the image does not matter here
    if not isinstance(parsed, Record):
        return []
    return parsed.captions + [c for col in extra for c in (parse_captions(parsed.meta.get(col)) or [])]


# -- counting ------------------------------------------------------------------------------------


def count_shard(url: str) -> int:
    """Samples in one shard (consecutive member keys), from the member headers; a damaged shard counts
    the samples before the damage, an unreadable one 0."""
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None

    def names() -> Iterator[str]:
        if is_local(url) and url.lower().endswith(".tar"):
            with tarfile.open(_local_path(url), "r:") as tar:
                yield from (i.name for i in tar if i.isreg())
        else:
            yield from (m["fname"] for m in _members(url, ShardStatus(url)))

    try:
        for name in names():
            base = name.rsplit("/", 1)[-1]
            prefix, _ = base_plus_ext(name)
            if prefix is None or (base.startswith("__") and base.endswith("__")):
                continue
            if prefix != last:
                n, last = n + 1, prefix
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass
    return n


def file_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _counts_files(folder: Path) -> list[Path]:
    from platformdirs import user_cache_dir

    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / COUNTS_FILE, Path(user_cache_dir("lipkit")) / "shard-counts" / f"{digest}.json"]


def _load_counts(folder: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for f in reversed(_counts_files(folder)):  # the file beside the shards wins
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            out.update({k: v for k, v in data.get("shards", {}).items() if isinstance(v, dict)})
        except (OSError, ValueError, AttributeError):
            continue
    return out


def save_counts(folder: Path, counts: dict[str, dict[str, int]]) -> Path | None:
    """Write `lipkit-counts.json` beside the shards (or into the user cache); returns where, or None."""
    body = json.dumps({"format": "lipkit-shard-counts", "version": 1, "shards": counts}, indent=1)
    for f in _counts_files(folder):
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(f, body)
            return f
        except OSError:
            continue
    return None


def cached_counts(urls: list[str]) -> dict[str, int]:
    """Counts of the local shards whose cached entry still matches the file (size and mtime)."""
    out: dict[str, int] = {}
    by_folder: dict[Path, list[str]] = {}
    for url in urls:
        if is_local(url):
            by_folder.setdefault(_local_path(url).parent, []).append(url)
    for folder, group in by_folder.items():
        cache = _load_counts(folder)
        for url in group:
            path, entry = _local_path(url), cache.get(shard_name(url))
            try:
                if entry and {k: entry.get(k) for k in ("bytes", "mtime_ns")} == file_stat(path):
                    out[url] = int(entry["samples"])
            except OSError:
                continue
    return out


def shard_counts(urls: list[str]) -> dict[str, int]:
    """Samples per shard: cached where still valid, counted (and cached) otherwise. Remote shards
    cannot be counted cheaply: pass data.samples_per_epoch for those."""
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise UserError(
            f"Shard '{remote[0]}' is not a local file, so its samples cannot be counted before training; "
            "set data.samples_per_epoch to the number of samples in one epoch."
        )
    out = cached_counts(urls)
    todo = [u for u in urls if u not in out]
    by_folder: dict[Path, list[str]] = {}
    for url in todo:
        path = _local_path(url)
        n = count_shard(url)
        out[url] = n
        if n and path.is_file():
            by_folder.setdefault(path.parent, []).append(url)
    for folder, group in by_folder.items():
        cache = _load_counts(folder)
        for url in group:
            cache[shard_name(url)] = {"samples": out[url], **file_stat(_local_path(url))}
        save_counts(folder, cache)
    return out
