"""Files and directories written atomically: a reader (or a resumed job) sees a file or a directory
whole, old or new, never half-written. The one writer (`atomic_write`) and the one directory swap
(`swap_dir`, or `write_dir` around it) that checkpoints, indexes, exports, datasets, embeddings and
results all use."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's entry list after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], text: bool = False) -> None:
    """write(file) into a temporary sibling, fsync, rename over `path`: readers see old or new, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") if text else open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), text=True)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=indent), text=True)


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def temp_dir_beside(dest: Path) -> Path:
    """A new empty directory next to `dest` (same file system, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))


def swap_dir(tmp: Path, dest: Path) -> Path:
    """Move the finished directory `tmp` into place at `dest`, replacing what was there only now (a file
    or a directory), with every file of `tmp` and the parent's entry list synced first."""
    for f in tmp.iterdir():
        if f.is_file():
            fsync_path(f)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return dest


def write_dir(dest: Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_dir) in a fresh directory beside `dest`, then swap it into place; on any failure
    the temporary directory is removed and `dest` is untouched."""
    dest = Path(dest).expanduser()
    tmp = temp_dir_beside(dest)
    try:
        write(tmp)
        return swap_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def job_manifest(out: Path, name: str, fmt: str, what: str) -> dict[str, Any] | None:
    """The manifest `name` (a JSON object whose "format" is `fmt`) of the resumable job folder `out`; None
    for a folder that does not exist yet or is empty. A file, a folder of other files or another
    manifest is refused in one sentence (`what` names the job's output: "scores", "embeddings")."""
    from lipkit.errors import UserError

    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"Output '{out}' is a file; pass a folder path for the {what}.")
    path = out / name
    if not path.is_file():
        if any(out.iterdir()):
            raise UserError(
                f"Output '{out}' exists and is not a {what} folder; choose a new or empty OUT folder."
            )
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = {}
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise UserError(f"'{path}' is not a lipkit {what} manifest; choose another OUT.")
    return manifest
