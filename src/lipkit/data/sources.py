"""Data sources: tables of (image path, captions) in CSV, TSV or JSONL.

A row names one image (relative to the image root, by default the table's own folder) and one or
more captions: a string, a JSON list in a CSV cell, or a list in JSONL. Every other column is kept
as metadata (e.g. class labels for zero-shot evaluation).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipkit.errors import UserError


@dataclass
class Record:
    image: Path
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [text]
        else:
            value = [text]
    if not isinstance(value, list):
        raise UserError(
            f"{where}: captions must be a string or a list of strings, got {type(value).__name__}."
        )
    return [str(c).strip() for c in value if str(c).strip()]


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(
                            f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that line."
                        ) from e
            return rows
        if suffix in (".csv", ".tsv"):
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise UserError(f"Data table '{path}' has an unsupported extension; use .csv, .tsv or .jsonl.")


def read_table(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> list[Record]:
    """Read a captions table; rows without any non-empty caption are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"Data table '{p}' does not exist; build the demo data with `lipkit data build emoji` "
            "or point data.train / --data at your CSV/JSONL file."
        )
    root = Path(image_root).expanduser() if image_root else p.parent
    rows = _rows(p)
    if not rows:
        raise UserError(f"Data table '{p}' has no rows; add (image, caption) rows to it.")
    for col in (image_column, caption_column):
        if col not in rows[0]:
            raise UserError(
                f"Data table '{p}' has no column '{col}' (it has {sorted(rows[0])}); "
                f"set data.image_column / data.caption_column to the right names."
            )
    records = []
    for n, row in enumerate(rows, 1):
        caps = _captions(row[caption_column], f"{p}:{n}")
        if caps:
            meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
            records.append(Record(root / str(row[image_column]), caps, meta))
    return records
