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

Reference means (the paper's "average" similarities), kept across steps as exponential moving averages
as in the authors' code, each updated with the step's batch mean before it is used:

    ā ← μ ā + (1 − μ) mean_i a_i,   b̄ ← μ b̄ + (1 − μ) mean_i b_i,   ē ← μ ē + (1 − μ) mean_i e_i

with μ = `momentum` (0.99 in the authors' code) and every mean starting at `initial` (1.0 there, the
largest cosine: early gates fire for nearly every sample). μ = 0 uses the batch's own means (a batch weighs
its samples against itself). The three means are a float64 buffer saved with the training state (exact
resume); the features are gathered across ranks before the loss, so every rank keeps the same means. In
evaluation mode the update is computed but not stored, and a non-finite batch (a step the trainer
skips) never enters them. Before momentum existed this loss used the batch means: `momentum: 0` gives that
loss back exactly; a run resumed from a checkpoint of that time starts the means afresh (a warning says so). γ = 2 is the value in the authors' code (exp(·)²,
written exp(2·)); all similarities and weights are computed without gradient.

What differs from the paper, and why:
- The weighted losses are normalised by Σ w (a weighted mean) instead of by B as in the authors'
  code (mean of w·ℓ); this only rescales a batch's loss by mean(w) and leaves the relative weighting
  of samples unchanged.
- L averages the two paths (the paper sums them), so L has InfoNCE's scale: with all weights equal it
  is ½ (InfoNCE(x, y) + InfoNCE(x, c)).
- The synthetic captions come from the table (a second caption column); the paper generates them with
  OFA, which lipkit does not run.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def similarities(
    image_features: torch.Tensor, text_features: torch.Tensor, synth_features: torch.Tensor
) -> torch.Tensor:
    """(3, B): a_i = <y_i, c_i>, b_i = <x_i, y_i>, e_i = <x_i, c_i>, without gradient."""
    with torch.no_grad():
        return torch.stack(
            [
                (text_features * synth_features).sum(dim=1),
                (image_features * text_features).sum(dim=1),
                (image_features * synth_features).sum(dim=1),
            ]
        )


@torch.no_grad()
def alip_weights(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    synth_features: torch.Tensor,
    gamma: float = 2.0,
    means: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights (w for the raw-text path, v for the synthetic path), each (B,), no gradient.

    `means`: the reference means (ā, b̄, ē) as a (3,) tensor; None uses the batch's own means."""
    a, b, e = similarities(image_features, text_features, synth_features)
    if means is None:
        means = torch.stack([a.mean(), b.mean(), e.mean()])
    means = means.to(a.dtype)
    sample = torch.exp(gamma * (a - means[0])).clamp(max=1.0)
    gated = sample < 1

    def pair(sim: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return torch.where(gated, torch.exp(gamma * (sim - mean)), torch.ones_like(sim))

    return sample * pair(b, means[1]), sample * pair(e, means[2])


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

    def __init__(self, gamma: float = 2.0, momentum: float = 0.99, initial: float = 1.0) -> None:
        """`gamma`: sharpness of the gates; 0 turns every weight into 1 (plain two-path CLIP).
        `momentum`: of the reference means' moving averages (0: the batch's own means).
        `initial`: the value every reference mean starts from."""
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if isinstance(initial, bool) or not isinstance(initial, int | float):
            raise ValueError(f"initial must be a number, got {initial!r}")
        self.gamma, self.momentum, self.initial = gamma, momentum, float(initial)
        self.register_buffer("means", torch.full((3,), float(initial), dtype=torch.float64))

    def reference_means(self, sims: torch.Tensor) -> torch.Tensor:
        """(3,) float64: the moving averages updated with this batch's means (stored while training; a
        non-finite batch, whose step the trainer skips, leaves the stored means as they were)."""
        means = self.momentum * self.means + (1 - self.momentum) * sims.mean(dim=1).double()
        if self.training:
            self.means = torch.where(torch.isfinite(means).all(), means, self.means)  # all or nothing
        return means

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        synth_features: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        means = self.reference_means(similarities(image_features, text_features, synth_features))
        w_raw, w_syn = alip_weights(image_features, text_features, synth_features, self.gamma, means)
        self.last_stats = {"weight_raw_mean": w_raw.mean(), "weight_syn_mean": w_syn.mean()}
        return 0.5 * (
            weighted_clip_loss(image_features, text_features, logit_scale, w_raw)
            + weighted_clip_loss(image_features, synth_features, logit_scale, w_syn)
        )
