"""TCL as its paper trains it: momentum (EMA) encoders with queues, cross-modal alignment with momentum
distillation, intra-modal contrast and local mutual information (Yang et al., 2022, "Vision-Language
Pre-Training with Triple Contrastive Learning"; the authors' code, github.com/uta-smile/TCL,
`models/model_pretrain.py`). `tcl` (objectives/intra_modal.py) is the in-batch form without them.

The objective keeps an EMA copy ξ of the model: after every optimiser step ξ ← m·ξ + (1−m)·θ (buffers
copied), m = `momentum`. With the online model's L2-normalised image features x_i (first augmentation)
and first-caption features y_i, the momentum model's x̂_i (a second augmentation of the image), ŷ_i (the
same caption), their token features x̂_ik (the image's token grid, average-pooled to `local_grid`² when
it is a square grid whose side is a larger multiple of `local_grid`, else left as it is) and ŷ_ik (the caption's non-padding tokens), queues Q_I, Q_T of the last
`queue_size` momentum features of earlier batches, Â = [x̂; Q_I], T̂ = [ŷ; Q_T], t the logit scale,
e_i the one-hot target of the sample's own column and α = `distill_alpha`:

    CMA   L_i2t = CE( t·x_i T̂ᵀ,  α·softmax(t·x̂_i T̂ᵀ) + (1−α)·e_i )     L_t2i = CE( t·y_i Âᵀ, α·softmax(t·ŷ_i Âᵀ) + (1−α)·e_i )
    IMC   L_i2i = CE( t·x_i Âᵀ, e_i )                                L_t2t = CE( t·y_i T̂ᵀ, e_i )
    LMI   L_img = −mean_{i,k} log [ e^{t<x_i, x̂_ik>} / (e^{t<x_i, x̂_ik>} + Σ_{j≠i, k'} e^{t<x_i, x̂_jk'>}) ],
          L_txt the same over ŷ with padding left out (averaged per caption over its tokens)
    L = ( L_i2t + L_t2i + L_i2i + L_t2t + λ·(L_img + L_txt) ) / 6          (λ = `local_weight`)

(with λ = 1 the reference's average of its six terms; CE(z, q) = −Σ_j q_j log softmax(z)_j, averaged over
the batch). After the optimiser step the global batch's x̂ and ŷ enter the queues (first in, first out; a
step skipped for a non-finite loss leaves them unchanged); they start as seeded random unit vectors, as in
the reference. Every rank holds the same ξ and queues (features are
gathered before the loss), and both are saved with the training state (exact resume).

What is not implemented of the paper:
- The fusion encoder and its image–text matching and masked-language-modelling losses (lipkit trains dual
  encoders); TCL's own temperature parameter (here the model's logit scale) and ALBEF's ramp of α over
  the first epoch (α is constant).
- The momentum text tower sees the same caption as the online one, as in the reference (its "text view"
  differs only by the momentum weights); `data.text_augment` edits that caption for both.
- Train-mode dropout in the momentum model (it runs in eval mode). `train.strategy=fsdp` is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import soft_cross_entropy
from lipkit.objectives.momentum import ema_update, momentum_copy


def pool_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, M, D) tokens of a g×g grid → (B, grid², D) averages of (g/grid)² blocks; any other M unchanged."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1] or side <= grid or side % grid:
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, side, side)
    return F.avg_pool2d(x, side // grid).flatten(2).transpose(1, 2)


def global_local_loss(
    local: torch.Tensor, anchor: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TCL's in-batch global-to-local term: each (sample i, local k) scores t<anchor_i, local_ik> against
    t<anchor_i, local_jk'> of every other sample j and valid k'; local (N, K, D), anchor (N, D), mask (N, K)."""
    n, k, _ = local.shape
    valid = torch.ones(n, k, dtype=torch.bool, device=local.device) if mask is None else mask.bool()
    scores = scale * torch.einsum("nd,mkd->nmk", anchor, local)  # [i, j, k] = t<anchor_i, local_jk>
    positive = scores[torch.arange(n), torch.arange(n)]  # (N, K)
    other = ~torch.eye(n, dtype=torch.bool, device=local.device)[:, :, None] & valid[None]
    negatives = scores.masked_fill(~other, float("-inf")).flatten(1).logsumexp(1, keepdim=True)
    per_token = torch.logaddexp(positive, negatives) - positive  # −log softmax of the positive
    per_token = per_token.masked_fill(~valid, 0.0)
    return (per_token.sum(1) / valid.sum(1).clamp(min=1)).mean()


class MomentumTripleContrast(nn.Module):
    def __init__(
        self,
        momentum: float = 0.995,
        queue_size: int = 1024,
        distill_alpha: float = 0.4,
        local_weight: float = 1.0,
        local_grid: int = 4,
        seed: int = 0,
    ) -> None:
        """`momentum` m of the EMA model; `queue_size` momentum features kept per modality (0: none);
        `distill_alpha` α of momentum distillation; `local_weight` λ of the two LMI terms; `local_grid`
        the side the image token grid is pooled to; `seed` draws the queues' initial vectors."""
        super().__init__()
        checks = {
            "momentum": (momentum, 0, 1, True),
            "distill_alpha": (distill_alpha, 0, 1, False),
            "local_weight": (local_weight, 0, math.inf, False),
        }
        for name, (value, lo, hi, open_top) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
            if open_top and value == hi:
                raise ValueError(f"{name} must be below {hi} (1 would never move the momentum model)")
        for name, value in {"queue_size": queue_size, "local_grid": local_grid, "seed": seed}.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if name == "local_grid" else 0)
            ):
                raise ValueError(
                    f"{name} must be a whole number ≥ {1 if name == 'local_grid' else 0}, got {value!r}"
                )
        self.momentum, self.distill_alpha = float(momentum), float(distill_alpha)
        self.local_weight = float(local_weight)
        self.queue_size, self.local_grid, self.seed = queue_size, local_grid, seed
        local = ("momentum_image_tokens_2", "momentum_text_tokens", "momentum_text_mask")  # the LMI terms'
        self.inputs = (
            "image_features",
            "text_features",
            "logit_scale",
            "momentum_image_features_2",
            "momentum_text_features",
            *(local if self.local_weight else ()),
        )
        self.momentum_model: nn.Module | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's features, to queue

    def bind_model(self, model: nn.Module) -> nn.Module:
        """The EMA copy ξ of `model` (frozen, eval mode) and the queues sized to its embedding width."""
        self.momentum_model = momentum_copy(model)
        dim, device = model.spec.embed_dim, next(model.parameters()).device
        g = torch.Generator().manual_seed(self.seed)
        queues = F.normalize(torch.randn(2, self.queue_size, dim, generator=g), dim=-1).to(device)
        self.register_buffer("image_queue", queues[0].clone())
        self.register_buffer("text_queue", queues[1].clone())
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
        return self.momentum_model

    def after_step(self, model: nn.Module) -> None:
        """After an optimiser step (never after a skipped, non-finite one): ξ ← m·ξ + (1−m)·θ over the
        parameters (buffers copied), and the step's momentum features enter the queues."""
        if self.momentum_model is not None:
            ema_update(self.momentum_model, model, self.momentum)
        if self._pending is not None:
            self._enqueue(*self._pending)
            self._pending = None

    @torch.no_grad()
    def _enqueue(self, image: torch.Tensor, text: torch.Tensor) -> None:
        if not self.queue_size or not hasattr(self, "image_queue"):  # no queue (or not bound: no model)
            return
        b = min(image.shape[0], self.queue_size)
        rows = ((int(self.queue_ptr) + torch.arange(b)) % self.queue_size).to(self.image_queue.device)
        self.image_queue[rows] = image[-b:].to(self.image_queue.dtype)
        self.text_queue[rows] = text[-b:].to(self.text_queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + b) % self.queue_size)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        momentum_image_features_2: torch.Tensor,
        momentum_text_features: torch.Tensor,
        momentum_image_tokens_2: torch.Tensor | None = None,
        momentum_text_tokens: torch.Tensor | None = None,
        momentum_text_mask: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        x, y, t = image_features, text_features, logit_scale
        x_m, y_m = momentum_image_features_2.to(x.dtype), momentum_text_features.to(x.dtype)
        queue_i = getattr(self, "image_queue", x.new_zeros(0, x.shape[1])).to(x.dtype)
        queue_t = getattr(self, "text_queue", x.new_zeros(0, x.shape[1])).to(x.dtype)
        all_i, all_t = torch.cat([x_m, queue_i]), torch.cat([y_m, queue_t])
        onehot = torch.eye(x.shape[0], all_i.shape[0], dtype=x.dtype, device=x.device)
        with torch.no_grad():
            i2t_target = (
                self.distill_alpha * F.softmax(t * x_m @ all_t.t(), dim=1) + (1 - self.distill_alpha) * onehot
            )
            t2i_target = (
                self.distill_alpha * F.softmax(t * y_m @ all_i.t(), dim=1) + (1 - self.distill_alpha) * onehot
            )
        terms = {
            "i2t": soft_cross_entropy(t * x @ all_t.t(), i2t_target),
            "t2i": soft_cross_entropy(t * y @ all_i.t(), t2i_target),
            "i2i": soft_cross_entropy(t * x @ all_i.t(), onehot),
            "t2t": soft_cross_entropy(t * y @ all_t.t(), onehot),
        }
        loss = sum(terms.values())
        if self.local_weight:
            if momentum_image_tokens_2 is None or momentum_text_tokens is None:
                raise ValueError(
                    "the local MI terms read the momentum model's tokens: pass momentum_*_tokens"
                )
            img_local = pool_grid(momentum_image_tokens_2.to(x.dtype), self.local_grid)
            txt_local = momentum_text_tokens.to(x.dtype)
            local = global_local_loss(img_local, x, t) + global_local_loss(
                txt_local, y, t, momentum_text_mask
            )
            terms["local"] = local
            loss = loss + self.local_weight * local
        self._pending = (x_m.detach(), y_m.detach())  # queued by after_step, once the step is taken
        self.last_stats = {f"tcl_{k}": v.detach() for k, v in terms.items()}
        return loss / 6
