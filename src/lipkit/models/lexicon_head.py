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
    """Token features (B, N, width) → non-negative vocabulary weights (B, vocab_size). Under FSDP the head is
    one unit whose `token_logits` and `pooled_logits` gather its weights like `forward` (train.fsdp)."""

    def __init__(self, width: int, vocab_size: int, bias_init: float = -2.5) -> None:
        super().__init__()
        self.proj = nn.Linear(width, vocab_size)
        nn.init.normal_(self.proj.weight, std=1.0)  # inputs are unit vectors: pre-activations ~ N(b, 1)
        nn.init.constant_(self.proj.bias, bias_init)

    def token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """W h + b of each token, (..., V): LexLIP's masked-language predictions."""
        return self.proj(tokens)

    def pooled_logits(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """max_k (W h_k + b): the raw vocabulary logits max-pooled over the tokens that count, (B, V) —
        LexLIP's bottleneck stage reads their softmax (objectives.lexicon_bottleneck). `mask` (B, N): true
        (or non-zero) for tokens that count; None counts every token."""
        return self._pooled(tokens, mask)

    def _pooled(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """pooled_logits without FSDP's hooks (forward has them already; train.fsdp hooks the public one)."""
        logits = self.proj(tokens)  # (B, N, V)
        if mask is not None:
            logits = logits.masked_fill(~mask.bool()[..., None], float("-inf"))
        # max with indices, not amax: its backward scatters into the argmax positions (amax's compares every
        # logit with the maximum and divides among ties: 2.9 of a 12.3 s demo-sized step)
        return logits.max(dim=1).values

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """w_v = log(1 + relu(max_k (W h_k + b)_v)): the max of the raw logits taken first, which gives the
        same weights as pooling log(1 + relu(·)) of each token (both maps are non-decreasing) on a (B, V)
        tensor instead of (B, N, V). A row whose tokens all fail `mask` gets zeros."""
        return torch.log1p(torch.relu(self._pooled(tokens, mask)))


def nonzero_terms(weights: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero vocabulary entries per row (the posting lists one item touches)."""
    return (weights != 0).sum(dim=-1).to(torch.float32).mean()
