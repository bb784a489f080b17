"""What `lipkit data convert | inspect | validate` do (the CLI only parses and prints).

- `convert`: any source (table, parquet, folder, shards) to WebDataset shards; image bytes are copied
  as they are (formats outside jpg/png/webp/gif/bmp/tif are re-encoded as PNG), unusable samples are
  skipped and counted; `lipkit-counts.json` is written beside the shards.
- `inspect`: counts and histograms without decoding any image (image sizes come from the headers).
- `validate`: decodes every image exactly as training does and lists what is broken, by reason.
"""

from __future__ import annotations

import io
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lipkit.data.images import try_load_image
from lipkit.data.records import Record, Skip
from lipkit.data.shard_writer import ShardOutput
from lipkit.data.sources.registry import estimate_total, scan, source_kind

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        transient=False,
    )


def image_bytes(record: Record, verify: bool = False, size: int = 32) -> tuple[bytes, str] | Skip:
    """The encoded image of a record and its file extension, or why it cannot be used. Without `verify`
    only the header is read (empty, missing, not an image, too large); with it the image is decoded."""
    data = record.data
    if data is None:
        try:
            data = Path(record.image).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            return Skip("missing_file", record.key, e.strerror or str(e))
        except PermissionError as e:
            return Skip("unreadable_file", record.key, e.strerror or str(e))
        except OSError as e:
            return Skip("unreadable_file", record.key, str(e))
    if not data:
        return Skip("empty_file", record.key, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on odd metadata
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                if w * h > Image.MAX_IMAGE_PIXELS:
                    return Skip("too_large", record.key, f"{w}x{h} pixels")
                if fmt not in FORMAT_EXT:
                    im.load()
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    data, fmt = buf.getvalue(), "PNG"
    except UnidentifiedImageError:
        return Skip("not_an_image", record.key, "unknown image format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Skip("too_large", record.key, str(e).split(".")[0])
    except Exception as e:  # noqa: BLE001 - damaged headers raise many types
        return Skip("corrupt_image", record.key, f"{type(e).__name__}: {e}"[:200])
    if verify:
        _, reason, detail = try_load_image(data, size)
        if reason:
            return Skip(reason, record.key, detail)
    return data, FORMAT_EXT[fmt]


@dataclass
class Report:
    """What a pass over a source found."""

    samples: int = 0  # usable samples
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> (key, detail)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def skip(self, s: Skip, keep: int = 10) -> None:
        self.skipped[s.reason] += s.count
        ex = self.examples.setdefault(s.reason, [])
        if len(ex) < keep:
            ex.append((s.key, s.detail))

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "skipped": dict(self.skipped),
            "examples": {r: [list(x) for x in ex] for r, ex in self.examples.items()},
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def _loop(
    items: Iterable[Record | Skip],
    desc: str,
    total: int | None,
    progress: bool,
    work: Callable[[Record], Skip | None],
    report: Report,
) -> Report:
    start = time.perf_counter()
    with _progress() if progress else _NoBar() as bar:
        task = bar.add_task(desc, total=total, info="")
        n = 0
        for n, item in enumerate(items, 1):
            outcome = item if isinstance(item, Skip) else work(item)
            if outcome is None:
                report.samples += 1
            else:
                report.skip(outcome)
            if n % 64 == 0 or total is None:
                bar.update(task, completed=n, info=_rate(report, start))
        bar.update(task, completed=n, total=total if total else n, info=_rate(report, start))
    report.seconds = time.perf_counter() - start
    return report


def _rate(report: Report, start: float) -> str:
    rate = report.samples / max(1e-9, time.perf_counter() - start)
    return f"{rate:,.0f} samples/s  {sum(report.skipped.values())} skipped"


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *args: object) -> None:
        return None

    def add_task(self, *args: object, **kw: object) -> int:
        return 0

    def update(self, *args: object, **kw: object) -> None:
        return None


def convert(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    verify: bool = False,
    progress: bool = True,
) -> Report:
    """Write WebDataset shards of `src` into `out`; the report's extra holds shards, pattern and rate."""
    writer = ShardOutput(Path(out), shard_size)

    def work(record: Record) -> Skip | None:
        got = image_bytes(record, verify)
        if isinstance(got, Skip):
            return got
        writer.write(record, *got)
        return None

    items = scan(src, image_column, caption_column, image_root)
    try:
        report = _loop(items, "convert", estimate_total(src), progress, work, Report())
    finally:
        shards = writer.close()
    report.extra = {
        "shards": len(shards),
        "pattern": writer.pattern(),
        "samples_per_s": round(report.samples / max(1e-9, report.seconds), 1),
    }
    return report


def _bin(value: int, edges: list[int]) -> str:
    for lo, hi in zip(edges, edges[1:], strict=False):
        if value < hi:
            return f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}"
    return f"{edges[-1]}+"


CAPTION_WORD_BINS = [1, 2, 3, 5, 9, 17, 33, 65]
IMAGE_SIDE_BINS = [1, 32, 64, 128, 256, 512, 1024, 2048]
CAPTIONS_PER_SAMPLE_BINS = [1, 2, 3, 5, 9, 17]


def inspect(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    limit: int = 0,
    progress: bool = True,
) -> Report:
    """Counts and histograms (caption words, captions per sample, image shorter side, formats, languages)."""
    words: Counter[str] = Counter()
    per_sample: Counter[str] = Counter()
    sides: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    captions = 0

    def work(record: Record) -> Skip | None:
        nonlocal captions
        captions += len(record.captions)
        per_sample[_bin(len(record.captions), CAPTIONS_PER_SAMPLE_BINS)] += 1
        for c in record.captions:
            words[_bin(len(c.split()), CAPTION_WORD_BINS)] += 1
        tags = record.meta.get("langs")
        if isinstance(tags, list):
            langs.update(str(t) for t in tags)
        elif isinstance(tags, str) and tags:
            langs[tags] += 1
        try:
            source = io.BytesIO(record.data) if record.data is not None else record.image
            with Image.open(source) as im:
                formats[str(im.format)] += 1
                sides[_bin(min(im.size), IMAGE_SIDE_BINS)] += 1
        except FileNotFoundError as e:
            return Skip("missing_file", record.key, e.strerror or str(e))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = "not_an_image" if isinstance(e, UnidentifiedImageError) else "corrupt_image"
            return Skip(reason, record.key, f"{type(e).__name__}: {e}"[:200])
        return None

    items: Iterator[Record | Skip] = scan(src, image_column, caption_column, image_root)
    if limit:
        items = (x for i, x in zip(range(limit), items, strict=False))
    total = estimate_total(src)
    report = _loop(
        items, "inspect", min(total, limit) if total and limit else total, progress, work, Report()
    )

    def ordered(c: Counter[str], edges: list[int]) -> dict[str, int]:
        names = [_bin(e, edges) for e in edges]
        return {k: c[k] for k in names if c[k]}

    report.extra = {
        "kind": source_kind(src).name,
        "captions": captions,
        "captions_per_sample": ordered(per_sample, CAPTIONS_PER_SAMPLE_BINS),
        "caption_words": ordered(words, CAPTION_WORD_BINS),
        "image_shorter_side": ordered(sides, IMAGE_SIDE_BINS),
        "image_formats": dict(formats.most_common()),
        "languages": dict(langs.most_common()),
    }
    return report


def _check(args: tuple[Record, int]) -> Skip | None:
    record, size = args
    _, reason, detail = try_load_image(record.data if record.data is not None else record.image, size)
    return Skip(reason, record.key, detail) if reason else None


def validate(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> Report:
    """Read every sample and decode every image as training would; the report counts what is broken."""
    items = scan(src, image_column, caption_column, image_root)
    total = estimate_total(src)
    if workers <= 0:
        return _loop(items, "validate", total, progress, lambda r: _check((r, size)), Report())
    # decode in a process pool, in order: skips from reading pass through as they are
    with get_context("fork").Pool(workers) as pool:
        results = pool.imap(_passthrough, ((x, size) for x in items), chunksize=16)
        return _loop(results, "validate", total, progress, lambda r: None, Report())


def _passthrough(args: tuple[Record | Skip, int]) -> Record | Skip:
    item, size = args
    if isinstance(item, Skip):
        return item
    return _check((item, size)) or item
