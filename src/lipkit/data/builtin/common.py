"""What the built-in benchmark builders share: the usable rows of a source, its fingerprint, and the
check that an output folder is new, empty or an earlier build of the same kind."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from lipkit.data.convert import image_bytes
from lipkit.data.records import Record
from lipkit.data.sources.registry import read_records
from lipkit.errors import UserError


def usable_records(
    source: Path, image_column: str = "image", caption_column: str = "captions"
) -> tuple[list[Record], dict[str, int]]:
    """The source's rows whose image bytes can be read (what the table can show), and the skipped counts."""
    records, skipped = read_records(source, image_column, caption_column)
    usable = []
    for r in records:
        got = image_bytes(r)
        if isinstance(got, tuple):
            usable.append(r)
        else:
            skipped[got.reason] += 1
    return usable, dict(skipped)


def fingerprint(records: Sequence[Record]) -> str:
    """A hash of the rows' keys and captions: a changed source is built again."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\0{json.dumps(r.captions, ensure_ascii=False)}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def check_build_out(out: Path, sources: Sequence[Path], fmt: str, what: str) -> dict[str, Any] | None:
    """The summary of the `fmt` build already in `out` (None for a new or empty folder); refuse a folder
    that holds a source or anything else."""
    dest = out.resolve()
    for source in sources:
        src = source.resolve()
        if dest == src.parent or dest in src.parents:
            raise UserError(f"--out '{out}' holds the source table '{source}'; choose a new folder.")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    with suppress(OSError, ValueError):
        old = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        if isinstance(old, dict) and old.get("format") == fmt:
            return old
    raise UserError(f"--out '{out}' exists and is not a {what}; choose a new or empty folder.")
