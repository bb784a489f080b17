"""The predictor-based self-supervised image terms the improved-baselines paper (Fini et al., 2023) puts
beside CLIP: SimSiam's ("SiamLIP"; Chen & He, 2021, "Exploring Simple Siamese Representation Learning")
and BYOL's ("BYOLIP"; Grill et al., 2020, "Bootstrap Your Own Latent").

With the two views' L2-normalised image embeddings z_1, z_2 and a predictor q (Linear → BatchNorm → ReLU
→ Linear, both papers' shape), cos the cosine similarity and sg a stop-gradient:

    SimSiam   L = −½ [ cos(q(z_1), sg(z_2)) + cos(q(z_2), sg(z_1)) ]           (mean over the batch)
    BYOL      L = [2 − 2 cos(q(z_1), z̄_2)] + [2 − 2 cos(q(z_2), z̄_1)]           (mean over the batch)

where z̄_v is an EMA (momentum) copy of the model's embedding of view v (objectives/momentum.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Predictor(nn.Module):
    """q: Linear(D, hidden, no bias: the BatchNorm after it removes any shift, as in SimSiam's code) →
    BatchNorm → ReLU → Linear(hidden, D), seeded."""

    def __init__(self, dim: int, hidden: int, seed: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.net[0], self.net[3]):
                bound = 1 / layer.weight.shape[1] ** 0.5  # PyTorch's default range, from our generator
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=g) * 2 - 1) * bound)
                if layer.bias is not None:
                    layer.bias.copy_((torch.rand(layer.bias.shape, generator=g) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


def simsiam_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """−½ [cos(q1, sg z2) + cos(q2, sg z1)], averaged over the batch."""
    return -0.5 * (F.cosine_similarity(q1, z2.detach()).mean() + F.cosine_similarity(q2, z1.detach()).mean())


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """(2 − 2 cos(q1, t2)) + (2 − 2 cos(q2, t1)) against the momentum model's embeddings t, batch mean."""
    return (2 - 2 * F.cosine_similarity(q1, t2.detach())).mean() + (
        2 - 2 * F.cosine_similarity(q2, t1.detach())
    ).mean()
