"""CLIP-Adapter's visual adapter (Gao et al., 2021, "CLIP-Adapter: Better Vision-Language Models with
Feature Adapters").

A bottleneck MLP on the image tower's output feature f (before normalisation), blended back residually:

    A(f) = ReLU(ReLU(f · W₁) · W₂)      W₁: D × D/r,  W₂: D/r × D  (no biases, as the paper's code)
    f′  = α · A(f) + (1 − α) · f

with reduction r = 4 and residual ratio α = 0.2, the paper's choices for the visual adapter. Only W₁ and W₂
train (lipkit adapt, CoOp's cross-entropy against the frozen zero-shot classifier); the towers stay as they
are. Applied by `DualEncoder.encode_image`, so every pooled image embedding has it (eval's zero-shot,
retrieval and linear probe, embed, search, serve) and the ONNX image graph carries it; OpenCLIP and Hugging
Face exports refuse it. Paths that read the tower's tokens (region embeddings, heat maps, token-wise
scoring, caption decoders) see the tower without it.

Not implemented: the paper's textual adapter (and the two combined), its SGD schedule (lipkit adapt uses
full-batch AdamW) and data augmentation of the shots.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.errors import UserError


class ImageAdapter(nn.Module):
    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2) -> None:
        super().__init__()
        if reduction < 1 or dim // reduction < 1 or not 0.0 <= ratio <= 1.0:
            raise UserError(
                f"CLIP-Adapter needs a reduction between 1 and the embedding size {dim} and a ratio in [0, 1], "
                f"not reduction {reduction}, ratio {ratio}."
            )
        self.ratio = ratio
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        adapted = torch.relu(self.up(torch.relu(self.down(features))))
        return self.ratio * adapted + (1 - self.ratio) * features
