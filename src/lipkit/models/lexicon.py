"""LexLIP's lexicon head (Luo et al., 2023): token features → one non-negative weight per vocabulary term.

    w_v = max_k log(1 + relu(W h_k + b)_v)      (max over the unmasked tokens k)

A model built with `lexicon_vocab > 0` carries one head per tower, so the sparse vectors it was trained
to produce can be computed at search time (`DualEncoder.encode_*_lexical`) and indexed by term.
"""

from __future__ import annotations

import torch
from torch import nn


class LexiconHead(nn.Module):
    """Token features (B, N, width) → non-negative vocabulary weights (B, vocab_size)."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, N): true (or non-zero) for tokens that count; None counts every token."""
        weights = torch.log1p(torch.relu(self.proj(tokens)))  # (B, N, V), ≥ 0
        if mask is not None:
            weights = weights.masked_fill(~mask.bool()[..., None], 0.0)  # 0 never wins a max of values ≥ 0
        return weights.amax(dim=1)


def nonzero_terms(weights: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero vocabulary entries per row (the posting lists one item touches)."""
    return (weights != 0).sum(dim=-1).to(torch.float32).mean()
