"""Data sources: where (image, captions) pairs come from.

Four kinds, chosen from the path alone (`source_kind`) so that one config key (`data.train`) serves all:

- a table: CSV / TSV / JSONL naming one image per row (relative to the image root, by default the
  table's own folder) and one or more captions (a string, a JSON list in a CSV cell, or a JSONL list);
- parquet: a `.parquet` file or a folder of them; the image column holds encoded bytes, a path, or a
  Hugging Face style struct `{bytes, path}`;
- WebDataset shards: `.tar` files, a brace pattern (`shards/{00000..00099}.tar`) or a folder of `.tar`
  files, in the img2dataset layout `key.jpg|png|webp` + `key.txt` and/or `key.json` (see `lipkit.data.shards`);
- a folder of images with sidecar captions (`cat.jpg` + `cat.txt` or `cat.json`).

Every column other than image and captions is kept as metadata (class labels for zero-shot evaluation,
`langs` for language filtering). A record's `key` names it the same way in every format: the `key`
column or field when there is one, else the image's path (a shard written by `lipkit data convert`
keeps the key of the row it came from).

Rows that cannot be used are never dropped silently: scanning yields a `Skip` with a reason from
`REASONS`, and the readers return the counts next to the records.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipkit.data.transforms import IMAGE_REASONS
from lipkit.errors import UserError

TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".ndjson")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # preference order in a shard
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CAPTION_KEYS = ("captions", "caption", "text", "texts", "txt")  # looked up after data.caption_column

REASONS = {
    **IMAGE_REASONS,
    "no_image": "the row or sample names no image",
    "no_caption": "no non-empty caption",
    "bad_text": "the caption or metadata text is not valid UTF-8 / JSON",
    "bad_row": "the table line cannot be parsed",
    "truncated_shard": "the tar shard ends in the middle of a file (samples after it are lost)",
    "corrupt_shard": "the tar shard has a damaged header or trailing garbage (samples after it are lost)",
    "unreadable_shard": "the tar shard cannot be opened",
}


@dataclass
class Record:
    image: Path  # the image file; for inline bytes, the file that holds them (parquet, shard)
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # the name of the sample in every format (default: the image path)
    data: bytes | None = None  # encoded image bytes when the source stores them inline

    def __post_init__(self) -> None:
        if not self.key:
            self.key = str(self.image)


@dataclass
class Skip:
    """A row or sample that cannot be used, and why (a key of REASONS)."""

    reason: str
    key: str
    detail: str = ""
    count: int = 1  # samples lost (a broken shard may take several with it)


# -- captions ------------------------------------------------------------------------------------


def _has_surrogates(text: str) -> bool:
    """True for text that came from undecodable bytes (or holds lone surrogates): it is not UTF-8."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_captions(value: Any) -> list[str] | None:
    """Captions from a cell: a string (a JSON list in a string is parsed), or a list of strings. Empty
    and whitespace-only captions are dropped. None when the value cannot be captions at all."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [text]
        else:
            value = [text]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [str(value)]  # a number in a text column
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        return None if value is not None else []
    out = []
    for c in value:
        if c is None or isinstance(c, dict | list):
            continue
        text = str(c).strip()
        if text and not _has_surrogates(text):
            out.append(text)
        elif text:
            return None
    return out


def caption_record(
    image: Path, captions: Any, meta: dict[str, Any], key: str, data: bytes | None = None
) -> Record | Skip:
    key = key or str(image)
    caps = parse_captions(captions)
    if caps is None:
        return Skip("bad_text", key, "captions are not text")
    if not caps:
        return Skip("no_caption", key, "no non-empty caption")
    return Record(image, caps, meta, key=key, data=data)


# -- kinds ---------------------------------------------------------------------------------------


def _is_pattern(src: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", src))


def source_kind(src: str | Path) -> str:
    """'shards', 'parquet', 'table' or 'folder', from the extension (or a folder's contents)."""
    s = str(src)
    low = s.lower()
    if low.startswith("pipe:") or _is_pattern(s) or low.endswith(SHARD_SUFFIXES):
        return "shards"
    if "://" in s:
        raise UserError(f"Data source '{s}' is a URL; stream it with a pipe: URL such as 'pipe:curl -s {s}'.")
    p = Path(s).expanduser()
    if low.endswith(".parquet"):
        return "parquet"
    if p.suffix.lower() in TABLE_EXTS:
        return "table"
    if p.is_dir():
        if next(p.glob("*.parquet"), None) is not None:
            return "parquet"
        if any(next(p.glob(f"*{suf}"), None) is not None for suf in SHARD_SUFFIXES):
            return "shards"
        return "folder"
    return "table"  # read_table names the missing file or the unsupported extension


# -- tables --------------------------------------------------------------------------------------


def _table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line, row or None, problem) for every row; undecodable bytes are kept as surrogates so that
    a bad line is reported, not fatal."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTS:
        raise UserError(f"Data table '{path}' has an unsupported extension; use .csv, .tsv or .jsonl.")
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, None, f"not valid JSON ({e.msg})"
                    continue
                yield (n, row, "") if isinstance(row, dict) else (n, None, "not a JSON object")
            return
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    yield reader.line_num, None, "more cells than columns"
                    continue
                yield reader.line_num, dict(row), ""
        except csv.Error as e:
            yield reader.line_num, None, f"CSV error ({e})"


def scan_table(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every row of a CSV/TSV/JSONL table as a Record or a Skip (the file itself must be readable)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"Data table '{p}' does not exist; build the demo data with `lipkit data build emoji` "
            "or point data.train / --data at your CSV/JSONL file."
        )
    root = Path(image_root).expanduser() if image_root else p.parent
    checked = False
    for n, row, problem in _table_rows(p):
        where = f"{p.name}:{n}"
        if row is None:
            yield Skip("bad_row", where, problem)
            continue
        if not checked:
            for col in (image_column, caption_column):
                if col not in row:
                    raise UserError(
                        f"Data table '{p}' has no column '{col}' (it has {sorted(row)}); "
                        f"set data.image_column / data.caption_column to the right names."
                    )
            checked = True
        image = row.get(image_column)
        key = str(row.get("key") or "")  # default: the image path
        if _has_surrogates(json.dumps(row, ensure_ascii=False)):
            yield Skip("bad_text", key or where, f"line {n} is not valid UTF-8")
            continue
        if not isinstance(image, str) or not image.strip():
            yield Skip("no_image", key or where, f"line {n} has no '{image_column}'")
            continue
        meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        yield caption_record(root / image.strip(), row.get(caption_column), meta, key)
    if not checked:
        raise UserError(f"Data table '{p}' has no rows; add (image, caption) rows to it.")


# -- folders -------------------------------------------------------------------------------------


def scan_folder(path: str | Path, caption_column: str = "captions") -> Iterator[Record | Skip]:
    """Every image under a folder (recursive, sorted) with its sidecar `name.txt` (one caption) or
    `name.json` (captions and metadata)."""
    root = Path(path).expanduser()
    files = sorted(
        f
        for f in root.rglob("*")
        if f.suffix.lower().lstrip(".") in IMAGE_EXTS
        and not any(s.startswith(".") for s in f.relative_to(root).parts)
    )
    if not files:
        raise UserError(
            f"Folder '{root}' holds no images ({', '.join(IMAGE_EXTS)}); point at a folder of images with "
            "captions in name.txt / name.json beside them, or at a table."
        )
    for f in files:
        key = f.relative_to(root).as_posix()
        side_json, side_txt = f.with_suffix(".json"), f.with_suffix(".txt")
        meta: dict[str, Any] = {}
        captions: Any = None
        if side_json.is_file():
            parsed = parse_json_meta(side_json.read_bytes(), caption_column)
            if isinstance(parsed, Skip):
                yield Skip(parsed.reason, key, parsed.detail)
                continue
            captions, meta = parsed
        if captions is None and side_txt.is_file():
            captions = side_txt.read_bytes()
        if captions is None:
            yield Skip("no_caption", key, f"no {side_txt.name} or {side_json.name}")
            continue
        yield caption_record(f, captions, meta, key)


def parse_json_meta(raw: bytes, caption_column: str = "captions") -> tuple[Any, dict[str, Any]] | Skip:
    """(captions or None, other fields) from a sample's JSON; a Skip when it is not UTF-8 JSON."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return Skip("bad_text", "", f"JSON metadata: {type(e).__name__}")
    if not isinstance(obj, dict):
        return Skip("bad_text", "", "JSON metadata is not an object")
    captions = None
    for name in (caption_column, *CAPTION_KEYS):
        if obj.get(name) not in (None, "", []):
            captions = obj[name]
            break
    meta = {k: v for k, v in obj.items() if k not in (caption_column, *CAPTION_KEYS)}
    return captions, meta


# -- any source ----------------------------------------------------------------------------------


def scan(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every sample of any source kind, as Records (image not decoded) and Skips."""
    kind = source_kind(src)
    if kind == "table":
        return scan_table(src, image_column, caption_column, image_root)
    if kind == "parquet":
        from lipkit.data.parquet_source import scan_parquet

        return scan_parquet(src, image_column, caption_column, image_root)
    if kind == "folder":
        return scan_folder(src, caption_column)
    from lipkit.data.shards import scan_shards

    return scan_shards(src, caption_column)


def collect(items: Iterable[Record | Skip]) -> tuple[list[Record], Counter[str]]:
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    for item in items:
        if isinstance(item, Skip):
            skipped[item.reason] += item.count
        else:
            records.append(item)
    return records, skipped


def read_records(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> tuple[list[Record], Counter[str]]:
    """All usable records of a source (any kind) and the count of skipped rows by reason."""
    return collect(scan(src, image_column, caption_column, image_root))


def describe(skipped: Counter[str] | dict[str, int]) -> str:
    """'3 corrupt_image, 1 no_caption' (largest first)."""
    return ", ".join(f"{n} {r}" for r, n in sorted(skipped.items(), key=lambda x: (-x[1], x[0])) if n)


def read_table(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> list[Record]:
    """Read a captions table (or any other source kind) into records; unusable rows are skipped with a
    warning that counts them by reason."""
    records, skipped = read_records(path, image_column, caption_column, image_root)
    if skipped:
        import warnings

        warnings.warn(f"{path}: skipped {sum(skipped.values())} rows ({describe(skipped)}).", stacklevel=2)
    return records
