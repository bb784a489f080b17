"""The predictor- and prototype-based self-supervised image terms the improved-baselines paper (Fini et al.,
2023) puts beside CLIP: SimSiam's ("SiamLIP"; Chen & He, 2021, "Exploring Simple Siamese Representation
Learning"), BYOL's ("BYOLIP"; Grill et al., 2020, "Bootstrap Your Own Latent") and SwAV's ("SwALIP"; Caron
et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

With the two views' L2-normalised image embeddings z_1, z_2 and a predictor q (Linear → BatchNorm → ReLU
→ Linear, both papers' shape), cos the cosine similarity and sg a stop-gradient:

    SimSiam   L = −½ [ cos(q(z_1), sg(z_2)) + cos(q(z_2), sg(z_1)) ]           (mean over the batch)
    BYOL      L = [2 − 2 cos(q(z_1), z̄_2)] + [2 − 2 cos(q(z_2), z̄_1)]           (mean over the batch)

where z̄_v is an EMA (momentum) copy of the model's embedding of view v (objectives/momentum.py). SwAV,
with K unit prototype vectors c_k, scores s_v = z_v Cᵀ and codes Q_v = Sinkhorn(s_v) (exp(s/ε), ε = 0.05,
3 Sinkhorn-Knopp iterations: every prototype gets an equal share of the batch, no gradient):

    SwAV      L = −½ [ Σ_k Q_2,k log softmax(s_1/τ)_k + Σ_k Q_1,k log softmax(s_2/τ)_k ]   (batch mean)

Not implemented of SwAV: its queue of earlier batches' features, its multi-crop (two views here) and
freezing the prototypes during the first epoch.
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


SINKHORN_EPSILON, SINKHORN_ITERATIONS = 0.05, 3  # SwAV's


class Prototypes(nn.Module):
    """SwAV's K prototype vectors (unit rows in the loss), seeded."""

    def __init__(self, dim: int, count: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(count, dim, generator=g))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.weight.dtype) @ F.normalize(self.weight, dim=-1).t()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor) -> torch.Tensor:
    """SwAV's codes: exp(scores/ε) scaled by Sinkhorn-Knopp so each prototype takes an equal share of the
    batch and each sample's codes sum to 1; (B, K) → (B, K)."""
    q = torch.exp((scores - scores.max()) / SINKHORN_EPSILON).t()  # (K, B); the max shift cancels below
    q = q / q.sum()
    k, b = q.shape
    for _ in range(SINKHORN_ITERATIONS):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).t()


def swav_loss(prototypes: Prototypes, z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Swapped prediction: each view's scores predict the other view's Sinkhorn codes,
    −½ [Σ_k q2_k log softmax(s1/τ)_k + Σ_k q1_k log softmax(s2/τ)_k], batch mean."""
    s1, s2 = prototypes(z1), prototypes(z2)
    q1, q2 = sinkhorn(s1), sinkhorn(s2)
    term1 = -(q2 * F.log_softmax(s1 / temperature, dim=1)).sum(1).mean()
    term2 = -(q1 * F.log_softmax(s2 / temperature, dim=1)).sum(1).mean()
    return 0.5 * (term1 + term2)
