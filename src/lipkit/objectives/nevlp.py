"""Noise-adaptive contrastive loss in the manner of NEVLP (Tao et al., 2024, "NEVLP: Noise-Robust
Framework for Efficient Vision-Language Pre-training"), whose noise-adaptive learning follows NLIP's
noise harmonisation (Huang et al., 2023, "NLIP: Noise-Robust Language-Image Pre-training"): estimate
each pair's probability of being mispaired from the memorisation effect (a network fits clean pairs
before noisy ones, so noisy pairs keep a high loss for longer) and weaken the alignment of pairs in
proportion to it.

Per pair (image i of the batch, its stable sample id k_i, logits_ij = t · <x_i, y_j>):

    one caption per image:   ℓ_i = ½ [CE(logits_i·, i) + CE(logits_·i, i)]
    several (multi_positive, captions P_i of image i, owners o_j; lipkit.objectives.multi_positive):
        ℓ_i = ½ [−Σ_{j ∈ P_i} (1/|P_i|) log softmax_j(logits_i·) + (1/|P_i|) Σ_{j ∈ P_i} CE(logits_·j, o_j)]

Loss history, kept per sample id across steps and epochs (a bank in the module's buffers), of the
step's centred losses ℓ̃_i = ℓ_i − mean_j ℓ_j (over the step's finite losses; a sample id twice in a
batch takes the mean of its ℓ̃; a non-finite loss is left out):
    h_k ← ℓ̃_k on its first sighting, then h_k ← μ h_k + (1 − μ) ℓ̃_k      (μ = `momentum`, no gradient)
Centring removes the drift of training: every loss falls as the model learns, so raw losses of early
steps would mark the samples seen first as noisy; relative to its batch, a mispaired pair stays high.

Noise probability: a two-component Gaussian mixture fitted by EM (10 iterations, variance floor 5e-4,
as DivideMix/NLIP fit per-sample losses) to the min–max normalised histories u = (h − lo)/(hi − lo) of
every sample seen so far, in the step after `warmup_steps` steps and every `refit_every` steps after
that (before the first fit every ε is 0; warmup_steps = 0 fits in the first step):
    ε_i = π_n N(u_i; m_n, s_n²) / Σ_c π_c N(u_i; m_c, s_c²)      (n: the component with the larger mean,
                                                                  u_i clamped to [0, 1])
Weighted loss, with the noise-adaptive factor ω_i = λ ε_i (λ = `strength`):
    w_i = 1 − ω_i,   L = Σ_i w_i ℓ_i / Σ_i w_i

With ε = 0 (λ = 0, or before the first fit) L is exactly InfoNCE (one caption) or multi_positive's loss
(every image with the same number of captions; to rounding: Σ w ℓ / Σ w with w = 1 is a mean). Every
rank sees the whole gathered batch and its sample ids, so every rank keeps the same bank (the sums are
sorted prefix sums, never atomic adds); the bank and the mixture are buffers saved with the training
state and resized on load (exact resume). Sample ids come from the records' keys, which must be unique
per pair: a table without a key column is keyed by image path, so rows repeating an image (one caption
per row) share one history. In evaluation mode nothing is stored and the batch's own centred losses
stand for the histories.

What is not implemented of the paper:
- NEVLP/NLIP estimate the noise from the loss of a cross-modal (fusion) transformer and apply ω_i inside
  their contrastive loss as a regularisation of the positive pair's target; here there is no fusion
  module, the loss history is that of the contrastive loss itself, and ω_i down-weights the pair (the
  issue's "pairs down-weighted by it").
- The mixture is refitted on a step cadence over an exponential moving average of batch-centred losses
  instead of once per epoch on that epoch's raw losses (μ = 0 and refit_every = steps per epoch come
  closest; the centring is ours, see above).
- Concept-enhanced learning (visual concepts from a corpus added to the text), the image-grounded text
  generation and matching heads, and the frozen LLM are not implemented.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

EM_ITERATIONS = 10
VARIANCE_FLOOR = 5e-4


def per_pair_losses(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_i of each image (B,), with gradient: symmetric InfoNCE per pair, or its multi-positive form
    when `caption_owner` (T,) names each caption's image (see the module docstring)."""
    logits = logit_scale * image_features @ text_features.t()  # (B, T)
    n = logits.shape[0]
    if caption_owner is None:
        labels = torch.arange(n, device=logits.device)
        rows = F.cross_entropy(logits, labels, reduction="none")
        return 0.5 * (rows + F.cross_entropy(logits.t(), labels, reduction="none"))
    owner = caption_owner.long()
    positives = (owner[None, :] == torch.arange(n, device=logits.device)[:, None]).to(logits.dtype)
    counts = positives.sum(1).clamp(min=1)
    rows = -(positives * F.log_softmax(logits, dim=1)).sum(1) / counts
    cols = F.cross_entropy(logits.t(), owner, reduction="none")  # (T,)
    return 0.5 * (rows + (positives * cols).sum(1) / counts)  # a dense sum: no atomics, deterministic


def segment_means(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct keys, the mean of `values` per key), by a stable sort and prefix sums: the same
    numbers on every device and run (an index_add would add repeated keys in any order on a GPU)."""
    order = keys.argsort(stable=True)
    k, v = keys[order], values[order]
    first = torch.ones_like(k, dtype=torch.bool)
    first[1:] = k[1:] != k[:-1]
    starts = first.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([k.numel()])])
    prefix = torch.cat([v.new_zeros(1), v.cumsum(0)])
    return k[starts], (prefix[ends] - prefix[starts]) / (ends - starts).to(v.dtype)


def fit_mixture(values: torch.Tensor) -> torch.Tensor:
    """Two-component 1-D Gaussian mixture of `values` by EM, as 8 numbers: (lo, hi, m₀, m₁, s₀², s₁², π₀,
    π₁) on the normalised scale u = (v − lo)/(hi − lo); component 1 is the one with the larger mean."""
    v = values.double()
    lo, hi = v.min(), v.max()
    u = (v - lo) / (hi - lo).clamp(min=1e-12)
    means = torch.tensor([0.0, 1.0], dtype=torch.float64, device=v.device)
    var = (u.var(unbiased=False) + VARIANCE_FLOOR).expand(2).clone()
    weights = torch.full((2,), 0.5, dtype=torch.float64, device=v.device)
    for _ in range(EM_ITERATIONS):
        resp = _responsibilities(u, means, var, weights)  # (N, 2)
        mass = resp.sum(0).clamp(min=1e-12)
        weights = mass / u.numel()
        means = (resp * u[:, None]).sum(0) / mass
        var = (resp * (u[:, None] - means) ** 2).sum(0) / mass + VARIANCE_FLOOR
    order = means.argsort()
    return torch.cat([torch.stack([lo, hi]), means[order], var[order], weights[order]])


def _responsibilities(
    u: torch.Tensor, means: torch.Tensor, var: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    log_p = -0.5 * ((u[:, None] - means) ** 2 / var + torch.log(2 * math.pi * var)) + torch.log(weights)
    return torch.softmax(log_p, dim=1)


def noise_probability(history: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    """ε of each loss history under `mixture` (fit_mixture's 8 numbers): the posterior of component 1."""
    lo, hi = mixture[0], mixture[1]
    u = ((history.double() - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    return _responsibilities(u, mixture[2:4], mixture[4:6], mixture[6:8])[:, 1]


class NoiseAdaptiveContrast(nn.Module):
    def __init__(
        self,
        strength: float = 1.0,
        momentum: float = 0.5,
        warmup_steps: int = 50,
        refit_every: int = 10,
        multi_positive: bool = False,
    ) -> None:
        """`strength` λ ∈ [0, 1]; `momentum` μ ∈ [0, 1) of the loss history; the first mixture is fitted
        after `warmup_steps` steps and refitted every `refit_every`; `multi_positive`: every caption of
        an image is a positive (needs data.captions_per_image ≥ 2), else the first caption only."""
        super().__init__()
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], not {strength!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), not {momentum!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a whole number ≥ 0, not {warmup_steps!r}")
        if int(refit_every) != refit_every or refit_every < 1:
            raise ValueError(f"refit_every must be a whole number ≥ 1, not {refit_every!r}")
        if not isinstance(multi_positive, bool):
            raise ValueError(f"multi_positive must be true or false, not {multi_positive!r}")
        self.strength, self.momentum = float(strength), float(momentum)
        self.warmup_steps, self.refit_every = int(warmup_steps), int(refit_every)
        self.inputs = ("image_features", "text_features", "logit_scale", "sample_key") + (
            ("caption_owner",) if multi_positive else ()
        )
        self.register_buffer("ids", torch.zeros(0, dtype=torch.int64))  # sorted sample ids
        self.register_buffer("history", torch.zeros(0, dtype=torch.float64))  # h of each id
        self.register_buffer("mixture", torch.zeros(8, dtype=torch.float64))  # all zero: not fitted yet
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.last_stats: dict[str, torch.Tensor] = {}

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in ("ids", "history"):  # the bank grows during training: take the saved size
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=self.ids.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position in the bank, whether the key is there) of each key."""
        if not self.ids.numel():
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self.ids, keys).clamp(max=self.ids.numel() - 1)
        return pos, self.ids[pos] == keys

    @torch.no_grad()
    def remember(self, keys: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Fold this step's centred losses into the bank (a key seen twice in the batch: their mean; a
        non-finite loss is left out) and return the history of each of `keys` (0 for one never stored)."""
        finite = torch.isfinite(losses)
        if finite.any():
            values = losses[finite].double()
            unique, mean = segment_means(keys[finite], values - values.mean())
            pos, known = self._find(unique)
            m = self.momentum
            self.history[pos[known]] = m * self.history[pos[known]] + (1 - m) * mean[known]
            if not bool(known.all()):
                ids = torch.cat([self.ids, unique[~known]])
                order = ids.argsort()
                self.ids = ids[order]
                self.history = torch.cat([self.history, mean[~known]])[order]
        pos, known = self._find(keys)
        return torch.where(known, self.history[pos] if self.ids.numel() else 0.0, 0.0).double()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        sample_key: torch.Tensor,
        caption_owner: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if "caption_owner" not in self.inputs:
            caption_owner = None
        elif caption_owner is None:
            raise ValueError("multi_positive needs the caption owners (the trainer passes caption_owner)")
        losses = per_pair_losses(image_features, text_features, logit_scale, caption_owner)
        if self.training:
            history = self.remember(sample_key, losses.detach())
            done = int(self.steps)  # steps before this one
            self.steps += 1
            due = done - self.warmup_steps
            if due >= 0 and due % self.refit_every == 0 and self.history.numel() > 1:
                self.mixture = fit_mixture(self.history)
        else:  # evaluation: this batch's own centred losses stand for the history
            history = losses.detach().double() - losses.detach().double().mean()
        fitted = bool(self.mixture[6:].sum() > 0)
        noise = noise_probability(history, self.mixture) if fitted else torch.zeros_like(history)
        weights = (1 - self.strength * noise).to(losses.dtype)
        self.last_stats = {"noise_mean": noise.mean(), "noisy_share": (noise > 0.5).double().mean()}
        return (weights * losses).sum() / weights.sum().clamp(min=1e-12)
