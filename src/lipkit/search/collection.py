"""What `lipkit embed` reads: the records of a folder of images or of any table/source `read_table`
knows, and fingerprints of a collection and of a checkpoint (an interrupted embed job resumes only when
both are unchanged)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from lipkit.data.records import Record
from lipkit.data.sources.registry import read_table, source_kind
from lipkit.errors import UserError


def collect(
    source: str | Path, image_column: str = "image", caption_column: str = "captions"
) -> list[Record]:
    """Records of a folder of images (recursive, sorted, no captions), or of anything `read_table`
    reads (CSV/TSV/JSONL captions tables and the other source kinds it knows)."""
    kind = source_kind(source)
    if kind.images_only is not None:
        return kind.images_only(source)
    return read_table(source, image_column=image_column, caption_column=caption_column)


def _digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in parts:
        h.update(s.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def records_fingerprint(records: Sequence[Record]) -> str:
    return _digest([f"{r.key}\t{r.captions[0] if r.captions else ''}" for r in records])


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """Hash of config.json and model.safetensors: a different checkpoint gives different vectors."""
    p = Path(checkpoint).expanduser()
    missing = [name for name in ("config.json", "model.safetensors") if not (p / name).is_file()]
    if missing:
        raise UserError(
            f"'{p}' is not a lipkit checkpoint (no {' or '.join(missing)}); pass the checkpoint folder "
            "`lipkit train` wrote (e.g. runs/demo/checkpoint)."
        )
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with (p / name).open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:32]
