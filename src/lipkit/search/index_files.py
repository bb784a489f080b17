"""What every lipkit index shares: the directory format (index.json + items.json), atomic saving, item
lists and query checks. The dense kinds live in `search.index`, the sparse one in `search.sparse_index`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lipkit import __version__
from lipkit.errors import UserError

FORMAT = "lipkit-index"


def _as_queries(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    q = np.asarray(x, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise UserError(f"{what} has shape {tuple(np.shape(x))}, but this index holds {dim}-d vectors.")
    return np.ascontiguousarray(q)


def _write_dir_atomically(dest: Path, write: Any) -> Path:
    """Call write(tmp_dir), then swap tmp_dir into `dest` (replacing an older directory)."""
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def default_items(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": start + i, "path": None, "caption": None, "meta": {}} for i in range(n)]


class Index(Protocol):
    kind: str
    dim: int
    items: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]: ...

    def add(self, vectors: Any, items: Sequence[dict[str, Any]] | None = None) -> None: ...

    def save(self, path: str | Path) -> Path: ...

    def memory_bytes(self) -> int: ...


def _renumber(items: Sequence[dict[str, Any]] | None, n: int, start: int) -> list[dict[str, Any]]:
    if items is None:
        return default_items(n, start)
    if len(items) != n:
        raise UserError(f"Got {n} vectors but {len(items)} item entries; they must match one to one.")
    return [{**it, "id": start + i} for i, it in enumerate(items)]


def _base_info(kind: str, dim: int, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": 1,
        "lipkit_version": __version__,
        "kind": kind,
        "dim": dim,
        "metric": "inner_product",
        "params": params,
        "sources": [],
    }


def _write_meta(tmp: Path, info: dict[str, Any], items: list[dict[str, Any]]) -> None:
    (tmp / "index.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    with (tmp / "items.json").open("w", encoding="utf-8") as f:
        json.dump(items, f, ensure_ascii=False, separators=(",", ":"))
