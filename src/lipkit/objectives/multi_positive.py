"""Multi-positive contrastive loss for several captions per image, as used by DreamLIP (Zheng et al.,
2024, "DreamLIP: Language-Image Pre-training with Long Captions"), which takes the multi-positive
InfoNCE of StableRep (Tian et al., 2023, "StableRep: Synthetic Images from Text-to-Image Models Make
Strong Visual Representation Learners").

B L2-normalised images x_i, T L2-normalised captions y_j, caption j belonging to image o_j
(`caption_owner`); P_i = {j : o_j = i} the captions of image i; logits_ij = t · <x_i, y_j>.

    image → text:  L_i2t = −1/|I| Σ_{i ∈ I} Σ_{j ∈ P_i} (1/|P_i|) log softmax_j(logits_i·)
                   (cross entropy against the uniform target over the image's own captions; I are
                   the images with at least one caption)
    text → image:  L_t2i = −1/T Σ_j log softmax_i(logits_·j)_{o_j}      (ordinary cross entropy)
    L = ½ (L_i2t + L_t2i)

An image's other captions are targets, never negatives: the optimum spreads the image's probability
evenly over all of them instead of pushing any away. With T = B and o = arange(B) this is exactly
CLIP's InfoNCE.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class MultiPositiveInfoNCE(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "caption_owner", "logit_scale")

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        caption_owner: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        owner = caption_owner.long()
        logits = logit_scale * image_features @ text_features.t()  # (B, T)
        n_images = logits.shape[0]
        positives = owner[None, :] == torch.arange(n_images, device=logits.device)[:, None]  # (B, T)
        counts = positives.sum(dim=1)
        has_caption = counts > 0
        target = positives.to(logits.dtype) / counts.clamp(min=1)[:, None].to(logits.dtype)
        i2t = -(target * F.log_softmax(logits, dim=1)).sum()  # rows without captions contribute 0
        i2t = i2t / has_caption.sum().clamp(min=1)
        t2i = F.cross_entropy(logits.t(), owner)
        return 0.5 * (i2t + t2i)
