"""LexLIP-style sparse lexicon representations (Luo et al., 2023, "LexLIP: Lexicon-Bottlenecked
Language-Image Pre-Training for Large-Scale Image-Text Sparse Retrieval").

A lexicon head maps the token features h_k (k = 1..N) of either tower to one non-negative weight per
vocabulary entry v, pooled by max over the (unmasked) tokens:

    w_v = max_k log(1 + relu(W h_k + b)_v)

so an image or caption becomes a sparse bag of words that an inverted index can search. Training
contrasts the lexicon vectors directly and keeps them sparse with the FLOPS regulariser (Paria et al.,
2020, "Minimizing FLOPs to Learn Efficient Sparse Representations"):

    FLOPS(w) = Σ_v (1/B Σ_b w_bv)²
    L = InfoNCE(w_img, w_txt) + λ · [FLOPS(w_img) + FLOPS(w_txt)]

where InfoNCE is CLIP's symmetric loss on the scaled dot products t · <w_img_i, w_txt_j> (lexicon
vectors are not normalised: their magnitude is what the index scores). λ = `flops_weight`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lipkit.objectives.infonce import InfoNCE


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


def flops_loss(weights: torch.Tensor) -> torch.Tensor:
    """Σ_v (mean over the batch of w_v)²: the expected cost of a sparse dot product, made differentiable."""
    return weights.mean(dim=0).pow(2).sum()


def nonzero_terms(weights: torch.Tensor) -> torch.Tensor:
    """Mean number of non-zero vocabulary entries per row (the posting lists one item touches)."""
    return (weights != 0).sum(dim=-1).to(torch.float32).mean()


class LexiconContrast(nn.Module):
    """InfoNCE on lexicon dot products plus λ · FLOPS on both sides.

    Give it the lexicon vectors (`image_lexicon`, `text_lexicon`, each (B, V)), or construct it with
    `width` and `vocab_size` to own one `LexiconHead` per tower and give it the token features
    (`image_tokens`, `text_tokens`, optional `text_mask` and `image_mask`) instead; its parameters
    then have to be trained alongside the model's.
    """

    inputs: ClassVar[tuple[str, ...]] = ("image_lexicon", "text_lexicon", "logit_scale")

    def __init__(
        self, flops_weight: float = 1e-3, width: int | None = None, vocab_size: int | None = None
    ) -> None:
        super().__init__()
        self.flops_weight = flops_weight
        self.infonce = InfoNCE()
        if (width is None) != (vocab_size is None):
            raise ValueError(
                "LexiconContrast needs both width and vocab_size to build its heads, or neither."
            )
        self.image_head = (
            LexiconHead(width, vocab_size) if width is not None and vocab_size is not None else None
        )
        self.text_head = (
            LexiconHead(width, vocab_size) if width is not None and vocab_size is not None else None
        )
        if self.image_head is not None:
            self.inputs = ("image_tokens", "text_tokens", "text_mask", "logit_scale")

    def forward(
        self,
        logit_scale: torch.Tensor,
        image_lexicon: torch.Tensor | None = None,
        text_lexicon: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if image_lexicon is None or text_lexicon is None:
            if (
                self.image_head is None
                or self.text_head is None
                or image_tokens is None
                or text_tokens is None
            ):
                raise ValueError(
                    "LexiconContrast needs image_lexicon and text_lexicon, or heads (width, vocab_size) "
                    "and image_tokens and text_tokens."
                )
            image_lexicon = self.image_head(image_tokens, image_mask)
            text_lexicon = self.text_head(text_tokens, text_mask)
        contrast = self.infonce(image_lexicon, text_lexicon, logit_scale)
        return contrast + self.flops_weight * (flops_loss(image_lexicon) + flops_loss(text_lexicon))
