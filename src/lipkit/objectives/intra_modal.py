"""TCL-style triple contrast: cross-modal plus intra-modal InfoNCE (Yang et al., 2022,
"Vision-Language Pre-Training with Triple Contrastive Learning").

With L2-normalised image features x, text features y, and second augmented views x', y' of the same
samples (`image_features_2`, `text_features_2`; a text view may be the caption with token dropout):

    L = InfoNCE(x, y) + λ · [ InfoNCE(x, x') + InfoNCE(y, y') ]

where InfoNCE is CLIP's symmetric loss (`lipkit.objectives.infonce`) with the same scale t, and the
positives of the intra-modal terms are the two views of one sample. λ = `intra_weight`. TCL runs its
intra-modal terms against momentum-encoder views and queues; here both views come from the training
encoders and the negatives are the rest of the batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lipkit.objectives.infonce import InfoNCE


class TripleContrast(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = (
        "image_features",
        "text_features",
        "image_features_2",
        "text_features_2",
        "logit_scale",
    )

    def __init__(self, intra_weight: float = 1.0) -> None:
        super().__init__()
        self.intra_weight = intra_weight
        self.infonce = InfoNCE()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        image_features_2: torch.Tensor,
        text_features_2: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        cross = self.infonce(image_features, text_features, logit_scale)
        intra = self.infonce(image_features, image_features_2, logit_scale) + self.infonce(
            text_features, text_features_2, logit_scale
        )
        return cross + self.intra_weight * intra
