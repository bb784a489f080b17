"""CLIP-Refine post-pre-training alignment (Yamaguchi et al., 2025, "Post-pre-training for Modality
Alignment in Vision-Language Foundation Models"): a short run from a trained checkpoint that closes
the modality gap without forgetting, with two terms.

Random feature alignment (RaFA): image and text features of a pair are both pulled to the same random
reference z_i drawn from a shared prior — here uniform on the unit sphere, z_i = g_i/‖g_i‖ with
g_i ~ N(0, I) — so the two modalities come to share one distribution:

    L_RaFA = 1/B Σ_i ( ‖x_i − z_i‖² + ‖y_i − z_i‖² ) / 2

Hybrid contrastive–distillation (HyCD): the contrastive targets are a mix of the ground truth and the
frozen starting model's (the teacher's) own similarity distribution, so knowledge is kept:

    Q^{i→t} = α·I + (1 − α)·softmax(s_T · X_T Y_Tᵀ)      (rows; t→i likewise on columns)
    L_HyCD  = ½ [ CE(Q^{i→t}, softmax(s · X Yᵀ)) + CE(Q^{t→i}, softmax(s · Y Xᵀ)) ]

    L = L_HyCD + λ · L_RaFA        (α = 0.5, λ = 1 by default; s_T is the teacher's logit scale)

What RaFA does, checked: for L2-normalised x, ‖x − z‖² = 1 − 2⟨x, z⟩ + ‖z‖², so ∂L/∂x = −z, whose
expectation over a zero-mean prior is 0 — RaFA adds noise that is shared by the two features of a pair
(the same z kicks both), not a systematic pull. The authors' code (yshinya6/clip-refine,
updater/contrastive.py, RandRegUpdater with strategy std_sample) does the same with z ~ N(0, I) and an
MSE; their distillation there also compares unscaled cosine logits at temperature 1, where lipkit uses
the models' own logit scales.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import soft_cross_entropy


class CLIPRefine(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = (
        "image_features",
        "text_features",
        "logit_scale",
        "teacher_image_features",
        "teacher_text_features",
        "teacher_logit_scale",
    )

    def __init__(self, alpha: float = 0.5, rafa_weight: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.rafa_weight = alpha, rafa_weight

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        teacher_image_features: torch.Tensor,
        teacher_text_features: torch.Tensor,
        teacher_logit_scale: torch.Tensor,
        reference: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        b = image_features.shape[0]
        eye = torch.eye(b, device=image_features.device, dtype=image_features.dtype)
        with torch.no_grad():
            teacher = teacher_logit_scale * teacher_image_features @ teacher_text_features.t()
            q_i2t = self.alpha * eye + (1 - self.alpha) * teacher.softmax(dim=1)
            q_t2i = self.alpha * eye + (1 - self.alpha) * teacher.t().softmax(dim=1)
        logits = logit_scale * image_features @ text_features.t()
        hycd = 0.5 * (soft_cross_entropy(logits, q_i2t) + soft_cross_entropy(logits.t(), q_t2i))
        if reference is None:  # drawn from the global torch RNG, which checkpoints save and restore
            reference = F.normalize(torch.randn_like(image_features), dim=-1)
        rafa = (
            0.5
            * (((image_features - reference) ** 2).sum(1) + ((text_features - reference) ** 2).sum(1)).mean()
        )
        return hycd + self.rafa_weight * rafa
