"""Exports written atomically: everything goes into a temporary directory beside the destination, which
replaces the destination only once complete (OpenCLIP, Hugging Face and ONNX exports share this)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lipkit.errors import UserError


def fresh_dir(out: Path, overwrite: bool) -> Path:
    """A new temporary directory beside `out` to write an export into; refuses a non-empty `out` unless
    `overwrite`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"Output '{out}' already exists; choose a new path or pass --overwrite.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def publish(tmp: Path, out: Path) -> Path:
    """Move a finished temporary directory into place (replacing `out` only now that all is written)."""
    if not out.exists():
        os.replace(tmp, out)
        return out
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
    return out
