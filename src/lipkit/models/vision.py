"""ViT image tower: patchify → [cls] + learnable positions → pre-norm transformer → cls → projection."""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.presets import ModelSpec
from lipkit.models.transformer import Transformer


class VisionTransformer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.image_size % spec.patch_size:
            raise ValueError(
                f"image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}"
            )
        w = spec.vision_width
        grid = spec.image_size // spec.patch_size
        scale = w**-0.5
        self.image_size = spec.image_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(
            w, spec.vision_layers, spec.vision_heads, spec.mlp_ratio, spec.quick_gelu
        )
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, spec.embed_dim))

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        x = self.conv1(images).flatten(2).transpose(1, 2)  # B, N, W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)
        pooled = x[:, 0] @ self.proj
        if return_tokens:
            return pooled, x[:, 1:] @ self.proj
        return pooled
