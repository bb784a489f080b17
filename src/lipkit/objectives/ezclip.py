"""EZ-CLIP's objective (Ahmad et al., 2023, "EZ-CLIP: Efficient Zero-Shot Video Action Recognition"; read
against the authors' code, github Shahzadnit/EZ-CLIP, utils/KLLoss.py `Motion_loss` and train.py): the
contrastive loss on the clip embeddings plus a motion loss that pushes the frame embeddings of a clip apart
in time, so that the temporal prompts (models/frame_prompts.py) carry motion.

With e_{b,t,d} the unnormalised frame embeddings of clip b (T frames, D dims):

    c_{b,t,d} = |e_{b,t+1,d} − e_{b,t−1,d}| / 2      (central differences; the ends repeat the edge frame)
    C = mean_{b,t,d} c,   V = mean_{b,d} Var_t(e_{b,·,d})   (unbiased variance over the frames)
    L_motion = 1 / (C + V + 1)
    L = InfoNCE(clip embeddings, captions) + λ · L_motion          (λ = `motion_weight`, 1 as the code)

Not implemented: ActionCLIP's KL loss over same-class targets that EZ-CLIP trains with (lipkit's InfoNCE
takes its place: the captions of a batch are its classes), and its text-tower adapters (models/frame_prompts.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lipkit.objectives.infonce import InfoNCE


def motion_loss(frames: torch.Tensor) -> torch.Tensor:
    """1 / (C + V + 1) of (B, T, D) frame embeddings (the module docstring)."""
    e = frames.to(torch.promote_types(frames.dtype, torch.float32))  # bf16 frames: the sums in float32
    padded = torch.cat([e[:, :1], e, e[:, -1:]], dim=1)
    central = (padded[:, 2:] - padded[:, :-2]).abs() / 2
    variance = e.var(dim=1).mean() if e.shape[1] > 1 else e.new_zeros(())
    return 1.0 / (central.mean() + variance + 1.0)


class EZCLIPLoss(nn.Module):
    local_form: ClassVar[str | None] = None
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "logit_scale", "frame_features")

    def __init__(self, motion_weight: float = 1.0) -> None:
        super().__init__()
        if motion_weight < 0:
            raise ValueError(f"motion_weight must be 0 or more, not {motion_weight}")
        self.motion_weight = motion_weight
        self.contrast = InfoNCE()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        frame_features: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        loss = self.contrast(image_features, text_features, logit_scale)
        return loss + self.motion_weight * motion_loss(frame_features)
