"""CLIP with the training-recipe terms of "Improved Baselines for Vision-Language Pre-training" (Fini et
al., 2023): label smoothing of the contrastive targets, and optionally one of the self-supervised image
terms that paper compares on top of CLIP (SLIP's SimCLR term, Barlow Twins as in its "BarLIP", SimSiam's
"SiamLIP", BYOL's "BYOLIP" and SwAV's "SwALIP").

With L2-normalised image features x_i, text features y_j, a second augmented view x'_i of each image
(`image_features_2`), B pairs and logits t·<x_i, y_j>:

    label smoothing ε:   q_ij = (1 − ε) 1[i = j] + ε / B
    L_clip = ½ [ −1/B Σ_i Σ_j q_ij log softmax_j(t·<x_i, y_·>)  −  1/B Σ_j Σ_i q_ij log softmax_i(t·<x_·, y_j>) ]

    SimCLR (NT-Xent, τ = `ssl_temperature`), over the 2B embeddings z = (x, x'), p(k) the other view of k:
        L_ssl = −1/(2B) Σ_k log [ exp(<z_k, z_p(k)>/τ) / Σ_{m ≠ k} exp(<z_k, z_m>/τ) ]
    Barlow Twins (λ = `barlow_lambda`): each feature standardised over the batch (mean 0, biased variance
        + 1e-5, as a BatchNorm without affine), C = x̃ᵀ x̃' / B (D × D),
        L_ssl = Σ_d (1 − C_dd)² + λ Σ_{d ≠ e} C_de²
    SimSiam / BYOL: a predictor q on the embeddings, against the other view's embedding with a stop-gradient
        (SimSiam) or the other view's embedding by an EMA copy of the model (BYOL, momentum `ssl_momentum`);
    SwAV: K prototypes, each view's scores predicting the other view's Sinkhorn-Knopp codes (τ =
        `ssl_temperature`); the formulas are in objectives/siamese.py

    L = L_clip + w · L_ssl        (w = `ssl_weight`; no L_ssl with image_ssl: none)

ε = 0 with image_ssl: none is CLIP's InfoNCE exactly. Every rank sees the gathered batch, so the
batch statistics of Barlow Twins are the global batch's, as in one process.

What is not implemented of the paper:
- Its text and image augmentations are data-side parts of the recipe, not terms of this loss: lipkit's
  are `data.text_augment` (seeded word drop / swap / mask, data/text_augment.py — EDA's synonym
  replacement and random insertion need a thesaurus and are not there) and `augment.*`.
- The SSL terms act on the shared (L2-normalised) image embedding and its second view; SLIP and the
  paper put them on a separate MLP projector (with its own width) over the backbone's output.
- SwAV's queue, multi-crop and first-epoch frozen prototypes (objectives/siamese.py). BYOL's momentum
  schedule (0.996 → 1 in the paper) is a fixed `ssl_momentum`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.momentum import ema_update, momentum_copy
from lipkit.objectives.siamese import Predictor, Prototypes, byol_loss, simsiam_loss, swav_loss

SSL_TERMS = ("none", "simclr", "barlow_twins", "simsiam", "byol", "swav")
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
        ssl_hidden: int = 512,
        ssl_momentum: float = 0.99,
        swav_prototypes: int = 256,
    ) -> None:
        """`label_smoothing` ε of the contrastive targets (0: none). `image_ssl`: none, simclr or
        barlow_twins, weighted by `ssl_weight`; `ssl_temperature` is SimCLR's τ, `barlow_lambda` Barlow
        Twins' off-diagonal weight λ; `ssl_hidden` the SimSiam / BYOL predictor's width; `ssl_momentum` m of
        BYOL's EMA model; `swav_prototypes` K of SwAV (its τ is `ssl_temperature`)."""
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
        if isinstance(ssl_hidden, bool) or not isinstance(ssl_hidden, int) or ssl_hidden < 1:
            raise ValueError(f"ssl_hidden must be a whole number ≥ 1, got {ssl_hidden!r}")
        if (
            isinstance(ssl_momentum, bool)
            or not isinstance(ssl_momentum, int | float)
            or not 0 <= ssl_momentum < 1
        ):
            raise ValueError(f"ssl_momentum must be a number in [0, 1), got {ssl_momentum!r}")
        self.ssl_hidden, self.ssl_momentum = ssl_hidden, float(ssl_momentum)
        if isinstance(swav_prototypes, bool) or not isinstance(swav_prototypes, int) or swav_prototypes < 2:
            raise ValueError(f"swav_prototypes must be a whole number ≥ 2, got {swav_prototypes!r}")
        self.swav_prototypes = swav_prototypes
        self.prototypes: Prototypes | None = None
        second = ("image_features_2",) if image_ssl != "none" else ()
        target = ("momentum_image_features", "momentum_image_features_2") if image_ssl == "byol" else ()
        self.inputs = ("image_features", "text_features", "logit_scale", *second, *target)
        self.predictor: Predictor | None = None
        self.momentum_model: nn.Module | None = None

    def bind_model(self, model: nn.Module) -> nn.Module | None:
        """SimSiam's / BYOL's predictor sized to the embedding width; BYOL's EMA copy of the model."""
        if self.image_ssl in ("simsiam", "byol"):
            self.predictor = Predictor(model.spec.embed_dim, self.ssl_hidden).to(
                next(model.parameters()).device
            )
        if self.image_ssl == "swav":
            self.prototypes = Prototypes(model.spec.embed_dim, self.swav_prototypes).to(
                next(model.parameters()).device
            )
        if self.image_ssl == "byol":
            self.momentum_model = momentum_copy(model)
        return self.momentum_model

    def after_step(self, model: nn.Module) -> None:
        if self.momentum_model is not None:
            ema_update(self.momentum_model, model, self.ssl_momentum)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        image_features_2: torch.Tensor | None = None,
        momentum_image_features: torch.Tensor | None = None,
        momentum_image_features_2: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = smoothed_clip_loss(image_features, text_features, logit_scale, self.label_smoothing)
        if self.image_ssl == "none":
            return loss
        if image_features_2 is None:
            raise ValueError("image_ssl needs a second image view (the trainer passes image_features_2)")
        ssl = self._ssl(image_features, image_features_2, momentum_image_features, momentum_image_features_2)
        self.last_stats = {f"{self.image_ssl}_loss": ssl.detach()}
        return loss + self.ssl_weight * ssl

    def _ssl(
        self, z1: torch.Tensor, z2: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None
    ) -> torch.Tensor:
        if self.image_ssl == "simclr":
            return simclr_loss(z1, z2, self.ssl_temperature)
        if self.image_ssl == "barlow_twins":
            return barlow_twins_loss(z1, z2, self.barlow_lambda)
        if self.image_ssl == "swav":
            if self.prototypes is None:  # used outside a trainer, which binds them to the model first
                self.prototypes = Prototypes(z1.shape[1], self.swav_prototypes).to(z1.device)
            return swav_loss(self.prototypes, z1, z2, self.ssl_temperature)
        if self.predictor is None:  # used outside a trainer, which binds it to the model first
            self.predictor = Predictor(z1.shape[1], self.ssl_hidden).to(z1.device)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        if self.image_ssl == "simsiam":
            return simsiam_loss(q1, q2, z1, z2)
        if t1 is None or t2 is None:
            raise ValueError(
                "BYOL needs the momentum model's embeddings (the trainer passes momentum_image_features*)"
            )
        return byol_loss(q1, q2, t1, t2)
