"""Knowledge distillation from a frozen CLIP teacher into a smaller student (`lipkit distill`,
docs/distill.md), with the terms of TinyCLIP (Wu et al., 2023, "TinyCLIP: CLIP Distillation via Affinity
Mimicking and Weight Inheritance") and CLIP-KD (Yang et al., 2024, "CLIP-KD: An Empirical Study of CLIP
Model Distillation"), beside the student's own contrastive loss.

With the student's L2-normalised features x_i, y_j and logit scale s, the teacher's x̂_i, ŷ_j and ŝ, over
the global batch of B pairs:

    P^{i→t} = softmax_j(s·x_iᵀy_j / T),  P̂^{i→t} = softmax_j(ŝ·x̂_iᵀŷ_j / T)   (t→i: over the columns)
    L_kd   = ½ [ KL(P̂^{i→t} ‖ P^{i→t}) + KL(P̂^{t→i} ‖ P^{t→i}) ]   averaged over rows, times T²

— the cross-modal similarity distillation that TinyCLIP calls affinity mimicking and CLIP-KD relational
(CRD) distillation; KL rather than cross entropy, so the term is 0 when the student matches the teacher
(the gradient is the same). T = `kd_temperature` (1: each model at its own logit scale).

    L_feat = ½ [ 1/B Σ_i ‖W_I x_i − x̂_i‖² + 1/B Σ_j ‖W_T y_j − ŷ_j‖² ]

— CLIP-KD's feature distillation (FD), through learned linear projections W_I, W_T from the student's
width to the teacher's (initialised to the identity when the widths agree; they live in the objective,
are optimised and saved with the training state, and are not exported).

    G = row-normalise(F Fᵀ)  for a modality's features F (B × d),
    L_aff  = ½ [ 1/B² ‖G(X) − G(X̂)‖²_F + 1/B² ‖G(Y) − G(Ŷ)‖²_F ]

— intra-modal affinity (similarity-preserving) distillation after Tung & Mori (2019, "Similarity-
Preserving Knowledge Distillation"): the student keeps how the teacher relates the batch's images to one
another and its captions to one another.

    L = w_c · InfoNCE(s·XYᵀ) + w_kd · L_kd + w_feat · L_feat + w_aff · L_aff

With w_kd = w_feat = w_aff = 0 and w_c = 1 this is InfoNCE exactly; a student equal to the teacher (same
features and scale, identity projections) has L_kd = L_feat = L_aff = 0.

Not implemented: TinyCLIP's weight inheritance (the student is built fresh, not pruned from the teacher)
and its multi-stage progressive compression; CLIP-KD's masked feature distillation, gradient distillation
and interactive contrastive learning (student images against teacher texts); the teacher's features are
of the first caption of each image only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE


def kd_term(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """½ [KL(P̂ ‖ P) over rows + over columns] · T², rows averaged (the formula above)."""
    t = temperature

    def one_way(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        log_p, log_q = F.log_softmax(a / t, dim=1), F.log_softmax(b / t, dim=1)
        return (log_q.exp() * (log_q - log_p)).sum(1).mean()

    return 0.5 * (one_way(logits, teacher_logits) + one_way(logits.t(), teacher_logits.t())) * t * t


def affinity(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features @ features.t(), dim=1)


def affinity_term(features: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    b = features.shape[0]
    return ((affinity(features) - affinity(teacher)) ** 2).sum() / (b * b)


class Distillation(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = (
        "image_features",
        "text_features",
        "logit_scale",
        "teacher_image_features",
        "teacher_text_features",
        "teacher_logit_scale",
    )

    def __init__(
        self,
        contrastive_weight: float = 1.0,
        kd_weight: float = 1.0,
        feature_weight: float = 0.0,
        affinity_weight: float = 0.0,
        kd_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        weights = (contrastive_weight, kd_weight, feature_weight, affinity_weight)
        if min(weights) < 0 or not any(weights):
            raise ValueError("its weights must be ≥ 0 and not all 0")
        if kd_temperature <= 0:
            raise ValueError("kd_temperature must be > 0")
        self.contrastive_weight, self.kd_weight = contrastive_weight, kd_weight
        self.feature_weight, self.affinity_weight = feature_weight, affinity_weight
        self.kd_temperature = kd_temperature
        self.image_projection: nn.Linear | None = None
        self.text_projection: nn.Linear | None = None

    def bind_teacher(self, student_dim: int, teacher_dim: int) -> None:
        """The feature-distillation projections (student width → teacher width), when that term is on."""
        if not self.feature_weight:
            return
        gen = torch.Generator().manual_seed(0)
        projections = []
        for _ in range(2):
            layer = nn.Linear(student_dim, teacher_dim, bias=False)
            with torch.no_grad():
                if student_dim == teacher_dim:
                    layer.weight.copy_(torch.eye(teacher_dim))
                else:  # PyTorch's default Linear init, from a fixed seed
                    bound = 1.0 / student_dim**0.5
                    layer.weight.copy_(
                        torch.rand(teacher_dim, student_dim, generator=gen) * 2 * bound - bound
                    )
            projections.append(layer)
        self.image_projection, self.text_projection = projections

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        teacher_image_features: torch.Tensor,
        teacher_text_features: torch.Tensor,
        teacher_logit_scale: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        x, y, xt, yt = image_features, text_features, teacher_image_features, teacher_text_features
        loss = x.new_zeros(())
        if self.contrastive_weight:
            loss = loss + self.contrastive_weight * InfoNCE()(x, y, logit_scale)
        if self.kd_weight:
            logits, teacher = logit_scale * x @ y.t(), teacher_logit_scale * xt @ yt.t()
            loss = loss + self.kd_weight * kd_term(logits, teacher.to(logits.dtype), self.kd_temperature)
        if self.feature_weight:
            if self.image_projection is None or self.text_projection is None:
                raise ValueError("feature distillation needs bind_teacher(student_dim, teacher_dim) first")
            fx = ((self.image_projection(x) - xt) ** 2).sum(1).mean()
            fy = ((self.text_projection(y) - yt) ** 2).sum(1).mean()
            loss = loss + self.feature_weight * 0.5 * (fx + fy)
        if self.affinity_weight:
            aff = 0.5 * (affinity_term(x, xt.to(x.dtype)) + affinity_term(y, yt.to(y.dtype)))
            loss = loss + self.affinity_weight * aff
        return loss
