"""Tables: CSV / TSV / JSONL naming one image per row (relative to the image root, by default the
table's own folder) and one or more captions (a string, a JSON list in a CSV cell, or a JSONL list).
A row with a `frames` cell — a list of images or a video file — is a clip (data/frames.py).
Every other column is kept as metadata."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lipkit.data.composed import resolve_references
from lipkit.data.frames import FRAMES, frames_of
from lipkit.data.records import Record, Skip, caption_record, has_surrogates
from lipkit.data.regions import MASK
from lipkit.errors import UserError

TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".ndjson")


def names_table(src: str) -> bool:
    return Path(src).suffix.lower() in TABLE_EXTS


def count_rows(src: str | Path) -> int:
    """Rows of a table (lines, less a CSV/TSV header): cheap, for a progress bar."""
    p = Path(src).expanduser()
    with p.open("rb") as f:
        n = sum(1 for line in f if line.strip())
    return n - 1 if p.suffix.lower() in (".csv", ".tsv") else n


def table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
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
    for n, row, problem in table_rows(p):
        where = f"{p.name}:{n}"
        if row is None:
            yield Skip("bad_row", where, problem)
            continue
        if not checked:
            for col in (image_column, caption_column):
                if col not in row and not (col == image_column and FRAMES in row):
                    raise UserError(
                        f"Data table '{p}' has no column '{col}' (it has {sorted(row)}); "
                        f"set data.image_column / data.caption_column to the right names."
                    )
            checked = True
        image = row.get(image_column)
        cell = row.get(FRAMES)
        clip = frames_of(cell, root) if cell not in (None, "", []) else None
        key = str(row.get("key") or "")  # default: the image path
        if has_surrogates(json.dumps(row, ensure_ascii=False)):
            yield Skip("bad_text", key or where, f"line {n} is not valid UTF-8")
            continue
        if cell not in (None, "", []) and clip is None:
            yield Skip("bad_row", key or where, f"line {n}: '{FRAMES}' is not a list of images or a video")
            continue
        if clip is not None and not (isinstance(image, str) and image.strip()):  # named by its first frame
            image = str(clip.video if clip.video is not None else clip.items[0])
        if not isinstance(image, str) or not image.strip():
            yield Skip("no_image", key or where, f"line {n} has no '{image_column}' (or '{FRAMES}')")
            continue
        meta = {k: v for k, v in row.items() if k not in (image_column, caption_column, FRAMES)}
        if isinstance(meta.get(MASK), str) and meta[MASK].strip():  # a label image, found like the image
            meta[MASK] = str(root / meta[MASK].strip())
        resolve_references(meta, root)  # composed-retrieval queries name their reference like an image
        record = caption_record(root / image.strip(), row.get(caption_column), meta, key)
        if clip is not None and isinstance(record, Record):
            record.frames = clip
        yield record
    if not checked:
        raise UserError(f"Data table '{p}' has no rows; add (image, caption) rows to it.")
