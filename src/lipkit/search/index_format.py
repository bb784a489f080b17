"""What every lipkit index shares: the directory format (index.json + items.json), item lists and query
checks. The dense kinds live in `search.index`, the sparse one in `search.sparse_index`; both save
through `lipkit.atomic.write_dir` (a temporary sibling directory swapped into place)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lipkit import __version__
from lipkit.errors import UserError

FORMAT = "lipkit-index"


def as_queries(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Queries as a contiguous float32 Q×dim matrix (one vector becomes 1×dim)."""
    q = np.asarray(x, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise UserError(f"{what} has shape {tuple(np.shape(x))}, but this index holds {dim}-d vectors.")
    return np.ascontiguousarray(q)


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


def renumber(items: Sequence[dict[str, Any]] | None, n: int, start: int) -> list[dict[str, Any]]:
    """The item entries of n new vectors with ids from `start` (default entries when none are given)."""
    if items is None:
        return default_items(n, start)
    if len(items) != n:
        raise UserError(f"Got {n} vectors but {len(items)} item entries; they must match one to one.")
    return [{**it, "id": start + i} for i, it in enumerate(items)]


def base_info(kind: str, dim: int, params: dict[str, Any]) -> dict[str, Any]:
    """The index.json of a new index."""
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


def write_meta(tmp: Path, info: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """index.json and items.json into the directory being written."""
    (tmp / "index.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    with (tmp / "items.json").open("w", encoding="utf-8") as f:
        json.dump(items, f, ensure_ascii=False, separators=(",", ":"))


def item_bytes(entry: dict[str, Any]) -> Path | bytes | None:
    """Where an index entry's image is: its file, its bytes (a shard's, kept in images.bin), or None."""
    path, blob = entry.get("path"), entry.get("blob")
    if path and Path(path).is_file():
        return Path(path)
    if blob and Path(blob["file"]).is_file():
        with open(blob["file"], "rb") as f:
            f.seek(int(blob["offset"]))
            return f.read(int(blob["size"]))
    return None
