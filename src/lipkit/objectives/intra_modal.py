"""TCL-style triple contrast: cross-modal plus intra-modal InfoNCE (Yang et al., 2022,
"Vision-Language Pre-Training with Triple Contrastive Learning").

With L2-normalised image features x, text features y, and second views x', y' of the same samples
(`image_features_2`: a second random augmentation of the image; `text_features_2`: the second caption
drawn for the sample (`data.caption_policy`) — the same text as the first when the row has one caption,
unless `data.text_augment` edits each copy independently):

    L = InfoNCE(x, y) + λ · [ InfoNCE(x, x') + InfoNCE(y, y') ]

where InfoNCE is CLIP's symmetric loss (`lipkit.objectives.infonce`) with the same scale t, and the
positives of the intra-modal terms are the two views of one sample. λ = `intra_weight`.

This is the in-batch form: both views come from the training encoders and the negatives are the rest of
the batch. The paper's momentum (EMA) encoders, queues, momentum distillation and local mutual-information
terms are `tcl_momentum` (objectives/tcl_momentum.py, the preset configs/methods/tcl.yaml).
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
