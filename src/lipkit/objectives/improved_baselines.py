"""CLIP with the training-recipe terms of "Improved Baselines for Vision-Language Pre-training" (Fini et
al., 2023): label smoothing of the contrastive targets, and optionally one of the self-supervised image
terms that paper compares on top of CLIP (SLIP's SimCLR term, and Barlow Twins as in its "BarLIP").

With L2-normalised image features x_i, text features y_j, a second augmented view x'_i of each image
(`image_features_2`), B pairs and logits t·<x_i, y_j>:

    label smoothing ε:   q_ij = (1 − ε) 1[i = j] + ε / B
    L_clip = ½ [ −1/B Σ_i Σ_j q_ij log softmax_j(t·<x_i, y_·>)  −  1/B Σ_j Σ_i q_ij log softmax_i(t·<x_·, y_j>) ]

    SimCLR (NT-Xent, τ = `ssl_temperature`), over the 2B embeddings z = (x, x'), p(k) the other view of k:
        L_ssl = −1/(2B) Σ_k log [ exp(<z_k, z_p(k)>/τ) / Σ_{m ≠ k} exp(<z_k, z_m>/τ) ]
    Barlow Twins (λ = `barlow_lambda`): each feature standardised over the batch (mean 0, biased variance
        + 1e-5, as a BatchNorm without affine), C = x̃ᵀ x̃' / B (D × D),
        L_ssl = Σ_d (1 − C_dd)² + λ Σ_{d ≠ e} C_de²

    L = L_clip + w · L_ssl        (w = `ssl_weight`; no L_ssl with image_ssl: none)

ε = 0 with image_ssl: none is CLIP's InfoNCE exactly. Every rank sees the gathered batch, so the
batch statistics of Barlow Twins are the global batch's, as in one process.

What is not implemented of the paper:
- Its text and image augmentations are data-side parts of the recipe, not terms of this loss: lipkit's
  are `data.text_augment` (seeded word drop / swap / mask, data/text_augment.py — EDA's synonym
  replacement and random insertion need a thesaurus and are not there) and `augment.*`.
- The SSL terms act on the shared (L2-normalised) image embedding and its second view; SLIP and the
  paper put them on a separate MLP projector (with its own width) over the backbone's output.
- The other self-supervised terms the paper compares — SimSiam ("SiamLIP"), BYOL ("BYOLIP") and SwAV
  ("SwALIP") — need predictors, momentum encoders or prototypes and are not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SSL_TERMS = ("none", "simclr", "barlow_twins")
BN_EPS = 1e-5


def smoothed_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """CLIP's symmetric loss with targets (1 − ε) one-hot + ε / B in both directions."""
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (
        F.cross_entropy(logits, labels, label_smoothing=smoothing)
        + F.cross_entropy(logits.t(), labels, label_smoothing=smoothing)
    )


def simclr_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B L2-normalised embeddings: each one's positive is the other view of its image."""
    b = view_a.shape[0]
    z = torch.cat([view_a, view_b])
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


def barlow_twins_loss(view_a: torch.Tensor, view_b: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """Σ_d (1 − C_dd)² + λ Σ_{d≠e} C_de², C the cross-correlation of the batch-standardised views."""

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + BN_EPS)

    c = standardise(view_a).t() @ standardise(view_b) / view_a.shape[0]
    diagonal = torch.diagonal(c)
    return ((1 - diagonal) ** 2).sum() + off_diagonal * ((c**2).sum() - (diagonal**2).sum())


class ImprovedBaselines(nn.Module):
    def __init__(
        self,
        label_smoothing: float = 0.1,
        image_ssl: str = "none",
        ssl_weight: float = 1.0,
        ssl_temperature: float = 0.1,
        barlow_lambda: float = 0.0051,
    ) -> None:
        """`label_smoothing` ε of the contrastive targets (0: none). `image_ssl`: none, simclr or
        barlow_twins, weighted by `ssl_weight`; `ssl_temperature` is SimCLR's τ, `barlow_lambda` Barlow
        Twins' off-diagonal weight λ."""
        super().__init__()
        if image_ssl not in SSL_TERMS:
            raise ValueError(f"image_ssl is '{image_ssl}'; choose one of {', '.join(SSL_TERMS)}")
        numbers = {"label_smoothing": label_smoothing, "ssl_weight": ssl_weight}
        numbers |= {"ssl_temperature": ssl_temperature, "barlow_lambda": barlow_lambda}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if ssl_temperature <= 0:
            raise ValueError(f"ssl_temperature must be positive, got {ssl_temperature}")
        self.label_smoothing, self.image_ssl = float(label_smoothing), image_ssl
        self.ssl_weight, self.ssl_temperature = float(ssl_weight), float(ssl_temperature)
        self.barlow_lambda = float(barlow_lambda)
        second = ("image_features_2",) if image_ssl != "none" else ()
        self.inputs = ("image_features", "text_features", "logit_scale", *second)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        image_features_2: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = smoothed_clip_loss(image_features, text_features, logit_scale, self.label_smoothing)
        if self.image_ssl == "none":
            return loss
        if image_features_2 is None:
            raise ValueError("image_ssl needs a second image view (the trainer passes image_features_2)")
        if self.image_ssl == "simclr":
            ssl = simclr_loss(image_features, image_features_2, self.ssl_temperature)
        else:
            ssl = barlow_twins_loss(image_features, image_features_2, self.barlow_lambda)
        self.last_stats = {f"{self.image_ssl}_loss": ssl.detach()}
        return loss + self.ssl_weight * ssl
