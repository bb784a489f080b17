"""The token-wise index: every item's image token features, searched by FILIP's late interaction — the
similarity a FILIP (or Wukong) checkpoint was trained with and `lipkit eval` ranks by, instead of pooled
vectors that loss never trained (eval.token_similarity).

With an item's L2-normalised image tokens x_k (k = 1..T) and a text query's real tokens y_r (r ∈ R):

    score = 1/|R| Σ_{r ∈ R} max_k <x_k, y_r>          (each word finds its best patch: FILIP's s^T)

so a text query ranks the items as `lipkit eval`'s text → image retrieval does (exactly so at eval's default
fp32 and its own image_tokens_kept, what `lipkit embed` uses). The search is
exhaustive (every item scored, in blocks of items): exact, like the flat dense kind. Queries are
(Q, L, D) token features whose padding rows are zero (search.encode.encode_text_tokens).

A directory: index.json, items.json and tokens.npy (float32 N×T×D).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.search.index_format import base_info, renumber, write_meta

BLOCK_ELEMENTS = 1 << 24  # similarities held at once (64 MiB of float32)


def _tokens(x: Any, what: str) -> np.ndarray:
    t = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if t.ndim != 3 or t.shape[0] == 0 or t.shape[1] == 0:
        raise UserError(f"{what} must be a non-empty N×T×D array of token features, got shape {t.shape}.")
    if not np.isfinite(t).all():
        raise UserError(f"{what} contain NaN or infinite values; re-embed the collection.")
    return t


def late_interaction(items: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(N, T, D) item tokens, (Q, L, D) query tokens with zero rows at padding → (Q, N) scores: for each
    query, the mean over its real tokens of each token's best item token (FILIP's s^T)."""
    mask = queries.abs().sum(-1) > 0  # (Q, L) real tokens
    real = mask.any(0).nonzero()
    last = int(real.max()) + 1 if len(real) else 1
    queries, mask = queries[:, :last], mask[:, :last]  # the padding after every query's last token: no work
    counts = mask.sum(1).clamp(min=1).to(items.dtype)
    q, length, d = queries.shape
    n, t, _ = items.shape
    flat_q = queries.reshape(q * length, d).t()
    block = max(1, BLOCK_ELEMENTS // max(1, t * q * length))
    out = []
    for s in range(0, n, block):
        part = items[s : s + block]
        sims = (part.reshape(-1, d) @ flat_q).view(part.shape[0], t, q, length)
        best = sims.amax(dim=1).masked_fill(~mask[None], 0.0)  # (n, Q, L)
        out.append((best.sum(-1) / counts).t())
    return torch.cat(out, dim=1)


class TokenIndex:
    """Item token features (N×T×D); exact late-interaction search."""

    def __init__(self, tokens: np.ndarray, info: dict[str, Any], items: list[dict[str, Any]]) -> None:
        self.tokens, self.info, self.items = tokens, info, items
        self.kind = "tokens"
        self.dim = int(tokens.shape[2])

    @classmethod
    def build(cls, tokens: Any, items: Sequence[dict[str, Any]] | None = None) -> TokenIndex:
        t = _tokens(tokens, "The image tokens")
        info = base_info("tokens", t.shape[2], {"tokens_per_item": int(t.shape[1])})
        info["metric"] = "late_interaction"
        return cls(t, info, renumber(items, t.shape[0], 0))

    @classmethod
    def load(cls, path: Path, info: dict[str, Any], items: list[dict[str, Any]]) -> TokenIndex:
        try:
            tokens = np.load(path / "tokens.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(
                f"Index file '{path / 'tokens.npy'}' cannot be read ({e}); rebuild the index."
            ) from e
        return cls(_tokens(tokens, f"'{path / 'tokens.npy'}'"), info, items)

    @property
    def ntotal(self) -> int:
        return int(self.tokens.shape[0])

    def search(self, queries: np.ndarray, k: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each Q×k, best first (ties: the lower id); ids are -1 where fewer than k
        items exist. `queries`: (Q, L, D) or one (L, D) query's token features, zero rows at padding."""
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 2 else q
        if q.ndim != 3 or q.shape[2] != self.dim:
            raise UserError(
                f"A token-wise query has shape {tuple(np.shape(queries))}, but this index holds {self.dim}-d "
                "token features; search it with the checkpoint that embedded the collection."
            )
        with torch.inference_mode():
            scores = late_interaction(
                torch.from_numpy(self.tokens), torch.from_numpy(np.ascontiguousarray(q))
            )
            kk = min(k, scores.shape[1])
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kk]
            top = torch.gather(scores, 1, order)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        out = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids[:, :kk], out[:, :kk] = order.numpy(), top.numpy()
        return out, ids

    def add(self, tokens: Any, items: Sequence[dict[str, Any]] | None = None) -> None:
        t = _tokens(tokens, "The image tokens to add")
        if t.shape[1:] != self.tokens.shape[1:]:
            raise UserError(
                f"Cannot add {t.shape[1]}×{t.shape[2]} token features to an index of "
                f"{self.tokens.shape[1]}×{self.tokens.shape[2]}; embed them with the checkpoint that built it."
            )
        new = renumber(items, t.shape[0], self.ntotal)
        self.tokens = np.concatenate([self.tokens, t])
        self.items.extend(new)

    def memory_bytes(self) -> int:
        return int(self.tokens.nbytes)

    def save(self, path: str | Path) -> Path:
        self.info.update(count=self.ntotal, dim=self.dim, kind=self.kind)

        def write(tmp: Path) -> None:
            np.save(tmp / "tokens.npy", self.tokens, allow_pickle=False)
            write_meta(tmp, self.info, self.items)

        return write_dir(Path(path), write)
