"""Files written atomically (temporary sibling, fsync, rename): a reader — or a resumed `lipkit embed`
job — sees a file whole, old or new, never half-written."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write: Callable[[Any], None], text: bool = False) -> None:
    """write(file) into a temporary sibling, fsync, rename over `path`: readers see old or new, whole."""
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


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array))


def write_json_atomic(path: Path, obj: Any) -> None:
    indent = None if isinstance(obj, list) else 2
    atomic_write(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=indent), text=True)
