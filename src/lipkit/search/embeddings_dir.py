"""Reading an embeddings folder written by `lipkit embed` (see `search.embed` for its layout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.errors import UserError


@dataclass
class Embeddings:
    path: Path
    items: list[dict[str, Any]]
    manifest: dict[str, Any]

    def image(self) -> np.ndarray:
        return np.load(self.path / "image_emb.npy", mmap_mode="r", allow_pickle=False)

    def image_tokens(self) -> np.ndarray | None:
        """The N×T×D image token features of a token-wise checkpoint (memory-mapped), or None."""
        path = self.path / "image_tokens.npy"
        return np.load(path, mmap_mode="r", allow_pickle=False) if path.is_file() else None

    def lexical_file(self) -> Path | None:
        for name in ("lex.npy", "lex.npz"):
            if (self.path / name).is_file():
                return self.path / name
        return None


def load_embeddings(path: str | Path, need_dense: bool = True) -> Embeddings:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(
            f"Embeddings folder '{p}' does not exist; make it with `lipkit embed CHECKPOINT SOURCE {p}`."
        )
    manifest: dict[str, Any] = {}
    if (p / "manifest.json").is_file():
        manifest = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
        if not manifest.get("complete", False):
            raise UserError(
                f"Embeddings in '{p}' are incomplete (the embed job stopped); rerun the same `lipkit embed` "
                "command to finish them."
            )
    if need_dense and not (p / "image_emb.npy").is_file():
        raise UserError(f"'{p}' has no image_emb.npy; make it with `lipkit embed CHECKPOINT SOURCE {p}`.")
    items: list[dict[str, Any]] = []
    if (p / "ids.json").is_file():
        items = json.loads((p / "ids.json").read_text(encoding="utf-8"))
    return Embeddings(p, items, manifest)
