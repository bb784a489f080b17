"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training").

With L2-normalised image features x_i, text features y_j (i, j = 1..B), scale t (passed in already
exponentiated, as `logit_scale`) and bias b (`logit_bias`):

    u_ij = t · <x_i, y_j> + b,      z_ij = +1 if i = j else −1
    L = −1/B Σ_i Σ_j log σ(z_ij · u_ij)

Every pair is an independent binary classification; no softmax couples the batch. Because
−log σ(u) = softplus(u) − u and −log σ(−u) = softplus(u), this is computed as

    L = 1/B [ Σ_ij softplus(u_ij) − Σ_i u_ii ]

which needs no sign matrix. The paper initialises log t = log 10 and b = −10 (`INIT_LOG_LOGIT_SCALE`,
`INIT_LOGIT_SCALE`, `INIT_LOGIT_BIAS` below) so that the loss starts near the prior "almost every
pair is a negative".

`chunk_size` computes u in blocks of that many rows with a hand-written backward that recomputes each
block, so neither the forward nor the autograd graph ever holds the B×B matrix: memory grows as
chunk_size·B instead of B². Value and gradients are those of the unchunked form.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

INIT_LOG_LOGIT_SCALE = math.log(10.0)  # the paper's t' (the model stores log t)
INIT_LOGIT_SCALE = 10.0  # t = exp(t'), what DualEncoder's `init_logit_scale` takes
INIT_LOGIT_BIAS = -10.0


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """The loss with the full B×B logit matrix, differentiated by autograd."""
    logits = logit_scale * image_features @ text_features.t() + logit_bias
    return (F.softplus(logits).sum() - logits.diagonal().sum()) / image_features.shape[0]


class _ChunkedSigmoidLoss(torch.autograd.Function):
    """The same loss, computed and differentiated in row blocks that are recomputed in backward."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, chunk_size):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):
            n = x.shape[0]
            total = x.new_zeros(())
            for start in range(0, n, chunk_size):
                logits = scale * (x[start : start + chunk_size] @ y.t()) + bias
                total = total + F.softplus(logits).sum()
            diagonal = scale * (x * y).sum() + n * bias  # Σ_i u_ii
        ctx.save_for_backward(x, y, scale, bias)
        ctx.chunk_size = chunk_size
        return (total - diagonal) / n

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        n, chunk_size = x.shape[0], ctx.chunk_size
        g = grad_out / n
        # dL/du_ij = (σ(u_ij) − δ_ij) / B; the −δ part is handled in closed form after the loop.
        grad_x = torch.empty_like(x)
        grad_y = torch.zeros_like(y)
        grad_scale = torch.zeros_like(scale)
        grad_bias = torch.zeros_like(bias)
        for start in range(0, n, chunk_size):
            xb = x[start : start + chunk_size]
            sims = xb @ y.t()
            p = torch.sigmoid(scale * sims + bias) * g
            grad_x[start : start + chunk_size] = scale * (p @ y)
            grad_y = grad_y + scale * (p.t() @ xb)
            grad_scale = grad_scale + (p * sims).sum()
            grad_bias = grad_bias + p.sum()
        grad_x = grad_x - scale * g * y
        grad_y = grad_y - scale * g * x
        grad_scale = grad_scale - g * (x * y).sum()
        grad_bias = grad_bias - g * n
        return grad_x, grad_y, grad_scale, grad_bias, None


class SigmoidLoss(nn.Module):
    local_form: ClassVar[str | None] = "ring"  # train.local_losses: neighbour exchange, local × local blocks
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "logit_scale", "logit_bias")

    def __init__(self, chunk_size: int | None = None) -> None:
        """`chunk_size`: rows of the logit matrix per block; None computes the whole matrix at once."""
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        logit_scale = torch.as_tensor(logit_scale, dtype=image_features.dtype, device=image_features.device)
        logit_bias = torch.as_tensor(logit_bias, dtype=image_features.dtype, device=image_features.device)
        if self.chunk_size is None or self.chunk_size >= image_features.shape[0]:
            return sigmoid_loss(image_features, text_features, logit_scale, logit_bias)
        return _ChunkedSigmoidLoss.apply(
            image_features, text_features, logit_scale, logit_bias, self.chunk_size
        )
