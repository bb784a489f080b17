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

where InfoNCE is CLIP's symmetric loss on the dot products <w_img_i, w_txt_j> / τ (lexicon vectors are
not normalised: their magnitude is what the index scores). λ = `flops_weight`; τ = `temperature` is fixed
(1 by default, raw dot products as in sparse retrievers), or None to use the model's learnable CLIP
scale t. Known problem, measured on the emoji data from scratch: with either, training collapses to
uniform scores (loss ln B) within ~20 steps — most likely the FLOPS term silencing the ReLUs before the
contrast can use them; SPLADE ramps λ up quadratically over the first steps, which is the next thing to try.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lipkit.models.lexicon import LexiconHead, nonzero_terms  # noqa: F401 - re-exported
from lipkit.objectives.infonce import InfoNCE


def flops_loss(weights: torch.Tensor) -> torch.Tensor:
    """Σ_v (mean over the batch of w_v)²: the expected cost of a sparse dot product, made differentiable."""
    return weights.mean(dim=0).pow(2).sum()


class LexiconContrast(nn.Module):
    """InfoNCE on lexicon dot products plus λ · FLOPS on both sides.

    The lexicon vectors (`image_lexicon`, `text_lexicon`, each (B, V)) come from the model's own lexicon
    heads (`model.overrides.lexicon_vocab`; the trainer turns them on for this objective), so they are
    exported with the checkpoint and usable by `lipkit index build --kind sparse`.
    """

    inputs: ClassVar[tuple[str, ...]] = ("image_lexicon", "text_lexicon", "logit_scale")

    def __init__(self, flops_weight: float = 1e-3, temperature: float | None = 1.0) -> None:
        super().__init__()
        self.flops_weight, self.temperature = flops_weight, temperature
        self.infonce = InfoNCE()

    def forward(
        self, logit_scale: torch.Tensor, image_lexicon: torch.Tensor, text_lexicon: torch.Tensor, **_: object
    ) -> torch.Tensor:
        if self.temperature is not None:
            logit_scale = torch.tensor(
                1.0 / self.temperature, dtype=image_lexicon.dtype, device=image_lexicon.device
            )
        contrast = self.infonce(image_lexicon, text_lexicon, logit_scale)
        return contrast + self.flops_weight * (flops_loss(image_lexicon) + flops_loss(text_lexicon))
