"""LexLIP's lexicon head (Luo et al., 2023): token features → one non-negative weight per vocabulary term.

    w_v = max_k log(1 + relu(W h_k + b)_v)      (max over the unmasked tokens k)

A model built with `lexicon_vocab > 0` carries one head per tower, so the sparse vectors it was trained
to produce can be computed at search time (`DualEncoder.encode_*_lexical`) and indexed by term.

Initialisation matters here. The head reads L2-normalised token features, so PyTorch's default Linear
init gives pre-activations of std ≈ 1/√width (0.07 at width 192) — smaller than the default bias, so every
image starts with the *same* vector (its terms are the ones with a positive bias); the FLOPS regulariser
then drives every bias negative and all ReLUs die together (w = 0 everywhere, no gradient: the collapse
to loss ln B seen on the emoji data). Instead W ~ N(0, 1) (pre-activations of std 1, so terms depend on the
input) and b = −3, so that at the start a term fires only where the input pushes it three standard
deviations up: a few hundred of 8,192 terms per image (max over 65 tokens), a few dozen per caption.
"""

from __future__ import annotations

import torch
from torch import nn


class LexiconHead(nn.Module):
    """Token features (B, N, width) → non-negative vocabulary weights (B, vocab_size)."""

    def __init__(self, width: int, vocab_size: int, bias_init: float = -2.5) -> None:
        super().__init__()
        self.proj = nn.Linear(width, vocab_size)
        nn.init.normal_(self.proj.weight, std=1.0)  # inputs are unit vectors: pre-activations ~ N(b, 1)
        nn.init.constant_(self.proj.bias, bias_init)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, N): true (or non-zero) for tokens that count; None counts every token."""
        weights = torch.log1p(torch.relu(self.proj(tokens)))  # (B, N, V), ≥ 0
        if mask is not None:
            weights = weights.masked_fill(~mask.bool()[..., None], 0.0)  # 0 never wins a max of values ≥ 0
        return weights.amax(dim=1)


def nonzero_terms(weights: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero vocabulary entries per row (the posting lists one item touches)."""
    return (weights != 0).sum(dim=-1).to(torch.float32).mean()
