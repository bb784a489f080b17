"""SGA's set-level guided image attack (Lu et al., ICCV 2023, "Set-level Guidance Attack: Boosting
Adversarial Transferability of Vision-Language Pre-training Models"; read against github Zoky-2020/SGA),
the image step, ascended by attack.pgd's ℓ∞ PGD.

Each image x is guided by a set of texts T(x) — its captions (`--task retrieval`: every caption of the row)
or its class's prompts over the templates (`--task zeroshot`) — and seen at a set of scales: x itself and,
for each s in S = {0.5, 0.75, 1.25, 1.5}, x plus Gaussian noise (σ = 0.05) resized to s·H and back
(bicubic, clipped to [0, 1]); with f the normalised image embedding and t the normalised text embeddings:

    L(x) = −Σ_{x' ∈ scales(x)} Σ_{t ∈ T(x)} f(x')·t          (ascended: away from the whole set, at every scale)

The defaults are the reference code's: ε = 2/255, 10 steps of 0.5/255 from a uniform random start.

Not implemented from the paper: the text half of the co-attack (BERT-Attack substitutions guided by the
image, done before the image step — the guidance set here is the clean texts, not adversarial ones — and
the text step after it), so SGA here perturbs images only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lipkit.attack.pgd import Loss, embeddings

SCALES = (0.5, 0.75, 1.25, 1.5)
NOISE = 0.05
STEP = 0.5 / 255


def scaled_copies(
    x: torch.Tensor, scales: Sequence[float], gen: torch.Generator, noise: float = NOISE
) -> torch.Tensor:
    """(1 + len(scales))·B images: x, then each scale's noisy resized-and-back copy (differentiable)."""
    size = x.shape[-2:]
    copies = [x]
    for s in scales:
        noisy = x + torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * noise
        small = (round(size[0] * s), round(size[1] * s))
        resized = F.interpolate(noisy, size=small, mode="bicubic", align_corners=False, antialias=s < 1)
        copies.append(
            F.interpolate(
                resized.clamp(0, 1), size=size, mode="bicubic", align_corners=False, antialias=s > 1
            )
        )
    return torch.cat(copies)


def set_loss(
    model,
    guidance: torch.Tensor,
    mask: torch.Tensor,
    gen: torch.Generator,
    scales: Sequence[float] = SCALES,
    noise: float = NOISE,
) -> Loss:
    """−Σ_scales Σ_{t ∈ T(x)} f(x')·t per image; `guidance` (B, K, D) normalised texts, `mask` (B, K) which
    of the K are in each image's set."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        f = F.normalize(embeddings(model, scaled_copies(x, scales, gen, noise)), dim=-1)
        f = f.view(1 + len(scales), x.shape[0], -1)
        sims = torch.einsum("sbd,bkd->sbk", f, guidance.to(f))
        return -(sims * mask.to(f).unsqueeze(0)).sum((0, 2))

    return loss


def padded(sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (K_i, D) text sets as (B, max K, D) zero-padded, and the (B, max K) mask of real rows."""
    k = max(len(t) for t in sets)
    out = torch.zeros(len(sets), k, sets[0].shape[1], dtype=sets[0].dtype)
    mask = torch.zeros(len(sets), k, dtype=torch.bool)
    for i, t in enumerate(sets):
        out[i, : len(t)], mask[i, : len(t)] = t, True
    return out, mask
