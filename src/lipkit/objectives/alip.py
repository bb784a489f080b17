"""ALIP's adaptive contrastive loss (Yang et al., 2023, "ALIP: Adaptive Language-Image Pre-training
with Synthetic Caption").

Each image x_i comes with its raw caption y_i and a synthetic caption c_i (all L2-normalised). Two
gates weight the samples and pairs, from similarities computed without gradient:

    Language Consistency Gate (sample weight; raw text vs synthetic caption agree?):
        a_i = <y_i, c_i>,  W^s_i = min(1, exp(γ (a_i − ā)))
    Description Consistency Gate (pair weights; does each text describe the image?), only where the
    sample gate fired (W^s_i < 1), else 1:
        b_i = <x_i, y_i>,  W^t_i = exp(γ (b_i − b̄))  if W^s_i < 1  else 1
        e_i = <x_i, c_i>,  W^c_i = exp(γ (e_i − ē))  if W^s_i < 1  else 1

Each path is CLIP's symmetric loss with per-pair weights: ℓ_i(x, y) = ½ [CE_i(image i → texts) +
CE_i(text i → images)] with logits t·<x, y>, and

    L_raw = Σ_i w_i ℓ_i(x, y) / Σ_i w_i,   w_i = W^s_i W^t_i
    L_syn = Σ_i v_i ℓ_i(x, c) / Σ_i v_i,   v_i = W^s_i W^c_i
    L = ½ (L_raw + L_syn)

What differs from the paper, and why:
- ā, b̄, ē are the means over the current batch. The paper (and its code) track them as exponential
  moving averages across steps (momentum 0.99); this module keeps no state, so a batch weighs its
  samples against itself. γ = 2 is the value in the authors' code (exp(·)², written exp(2·)).
- The weighted losses are normalised by Σ w (a weighted mean) instead of by B as in the authors'
  code (mean of w·ℓ); this only rescales a batch's loss by mean(w) and leaves the relative weighting
  of samples unchanged.
- L averages the two paths (the paper sums them), so L has InfoNCE's scale: with all weights equal it
  is ½ (InfoNCE(x, y) + InfoNCE(x, c)).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def alip_weights(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    synth_features: torch.Tensor,
    gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights (w for the raw-text path, v for the synthetic path), each (B,), no gradient."""
    consistency = (text_features * synth_features).sum(dim=1)
    sample = torch.exp(gamma * (consistency - consistency.mean())).clamp(max=1.0)
    gated = sample < 1

    def pair(texts: torch.Tensor) -> torch.Tensor:
        sim = (image_features * texts).sum(dim=1)
        return torch.where(gated, torch.exp(gamma * (sim - sim.mean())), torch.ones_like(sim))

    return sample * pair(text_features), sample * pair(synth_features)


def weighted_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Σ_i w_i · ½ (CE_i rows + CE_i columns) / Σ_i w_i, the symmetric InfoNCE with per-pair weights."""
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_pair = 0.5 * (
        F.cross_entropy(logits, labels, reduction="none")
        + F.cross_entropy(logits.t(), labels, reduction="none")
    )
    return (weights * per_pair).sum() / weights.sum()


class ALIPLoss(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "synth_features", "logit_scale")

    def __init__(self, gamma: float = 2.0) -> None:
        """`gamma`: sharpness of the gates; 0 turns every weight into 1 (plain two-path CLIP)."""
        super().__init__()
        self.gamma = gamma

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        synth_features: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        w_raw, w_syn = alip_weights(image_features, text_features, synth_features, self.gamma)
        return 0.5 * (
            weighted_clip_loss(image_features, text_features, logit_scale, w_raw)
            + weighted_clip_loss(image_features, synth_features, logit_scale, w_syn)
        )
