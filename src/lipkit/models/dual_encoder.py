"""Two towers, projections into one embedding space, and CLIP's learnable logit scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.models.presets import ModelSpec
from lipkit.models.text import TextTransformer
from lipkit.models.vision import VisionTransformer


class DualEncoder(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: float = -10.0,
    ):
        super().__init__()
        self.spec = spec
        self.max_logit_scale = max_logit_scale
        self.visual = VisionTransformer(spec)
        self.text = TextTransformer(spec)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if spec.logit_bias else None

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.visual(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.text(ids)
        return F.normalize(feats, dim=-1) if normalize else feats

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(ids),
            "logit_scale": self.scale(),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
