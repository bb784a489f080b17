"""LexLIP-style sparse lexicon representations (Luo et al., 2023, "LexLIP: Lexicon-Bottlenecked
Language-Image Pre-Training for Large-Scale Image-Text Sparse Retrieval").

A lexicon head maps the token features h_k (k = 1..N) of either tower to one non-negative weight per
vocabulary entry v, pooled by max over the (unmasked) tokens:

    w_v = max_k log(1 + relu(W h_k + b)_v)

so an image or caption becomes a sparse bag of words that an inverted index can search. Training
contrasts the lexicon vectors directly and keeps them sparse with the FLOPS regulariser (Paria et al.,
2020, "Minimizing FLOPs to Learn Efficient Sparse Representations"), whose weight grows quadratically
over the first T steps as in SPLADE (Formal et al., 2021):

    FLOPS(w) = Σ_v (1/B Σ_b w_bv)²
    λ_t      = λ · min(1, (t / T)²)
    L = InfoNCE(w_img, w_txt; τ) + λ_t · [FLOPS(w_img) + FLOPS(w_txt)] + μ · InfoNCE(x_img, y_txt; s)

InfoNCE(w_img, w_txt; τ) is CLIP's symmetric loss on the raw dot products <w_img_i, w_txt_j> / τ (lexicon
vectors are not normalised: their magnitude is what the index scores). λ = `flops_weight`,
T = `flops_warmup` (steps; 0 = λ from the start), τ = `temperature` (None: the model's learnable CLIP
scale). The last term, μ = `dense_weight` (default 1, as configs/methods/lexlip.yaml), is the ordinary
CLIP loss on the dense embeddings beside the lexical one (LexLIP keeps a dense path too), which gives the
towers a signal while the sparse heads are still finding their terms; μ = 0 turns it off, which
docs/methods.md measured to be degenerate (every image predicted the same class). (The paper also pre-trains the heads with a
lexicon-bottlenecked masked-language-model stage; this objective is the contrastive stage only.)
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.lexicon_head import nonzero_terms
from lipkit.objectives.infonce import InfoNCE


def flops_loss(weights: torch.Tensor) -> torch.Tensor:
    """Σ_v (mean over the batch of w_v)²: the expected cost of a sparse dot product, made differentiable."""
    return weights.mean(dim=0).pow(2).sum()


class LexiconContrast(nn.Module):
    """InfoNCE on lexicon dot products plus λ_t · FLOPS on both sides (plus μ · dense InfoNCE).

    The lexicon vectors (`image_lexicon`, `text_lexicon`, each (B, V)) come from the model's own lexicon
    heads (`model.overrides.lexicon_vocab`; the trainer turns them on for this objective), so they are
    exported with the checkpoint and usable by `lipkit index build --kind sparse`. The number of training
    steps seen (for the FLOPS warm-up) is a buffer, so it is checkpointed and resumed with the run.
    `last_stats` holds the last step's mean non-zero terms per image and per caption, which the trainer logs.
    """

    def __init__(
        self,
        flops_weight: float = 1e-3,
        temperature: float | None = 1.0,
        flops_warmup: int = 50,
        dense_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.flops_weight, self.temperature = flops_weight, temperature
        self.flops_warmup, self.dense_weight = flops_warmup, dense_weight
        self.inputs = ("image_lexicon", "text_lexicon", "logit_scale") + (
            ("image_features", "text_features") if dense_weight else ()
        )
        self.infonce = InfoNCE()
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.last_stats: dict[str, torch.Tensor] = {}

    def flops_factor(self) -> float:
        """λ_t / λ: (t / T)² during the warm-up, then 1."""
        if self.flops_warmup <= 0:
            return 1.0
        return min(1.0, (int(self.steps_seen) / self.flops_warmup) ** 2)

    def forward(
        self,
        logit_scale: torch.Tensor,
        image_lexicon: torch.Tensor,
        text_lexicon: torch.Tensor,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        scale = logit_scale
        if self.temperature is not None:
            scale = torch.tensor(
                1.0 / self.temperature, dtype=image_lexicon.dtype, device=image_lexicon.device
            )
        loss = self.infonce(image_lexicon, text_lexicon, scale)
        weight = self.flops_weight * self.flops_factor()
        if weight:
            loss = loss + weight * (flops_loss(image_lexicon) + flops_loss(text_lexicon))
        if self.dense_weight and image_features is not None and text_features is not None:
            loss = loss + self.dense_weight * self.infonce(image_features, text_features, logit_scale)
        if torch.is_grad_enabled():  # a training step: advance the warm-up, keep the numbers to log
            self.steps_seen += 1
            self.last_stats = {
                "lexicon/image_nonzero_terms": nonzero_terms(image_lexicon.detach()),
                "lexicon/text_nonzero_terms": nonzero_terms(text_lexicon.detach()),
            }
        return loss
