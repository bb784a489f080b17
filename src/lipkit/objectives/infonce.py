"""CLIP's symmetric InfoNCE loss (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision").

With L2-normalised image features x_i, text features y_j and learnable scale s = exp(t):

    logits_ij = s · <x_i, y_j>
    L = ½ [ −1/N Σ_i log softmax_j(logits)_ii  −  1/N Σ_j log softmax_i(logits)_jj ]

i.e. the mean of cross-entropy over rows (image→text) and over columns (text→image), with the
matching pair on the diagonal.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy of softmax(logits) against each row's target distribution."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


class InfoNCE(nn.Module):
    local_form: ClassVar[str | None] = "rows"  # train.local_losses: each rank its own rows and columns
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "logit_scale")

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        logits = logit_scale * image_features @ text_features.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class WidthBound(nn.Module):
    """An objective with a head of its own sized to the model's embeddings (script ordering, VDI): the trainer
    calls `bind_model` before it builds the optimizer; `bind_width(dim)` makes the head (tests call it alone)."""

    def bind_width(self, dim: int) -> None:
        raise NotImplementedError

    def bind_model(self, model: nn.Module) -> None:
        self.bind_width(model.spec.embed_dim)
        self.to(next(model.parameters()).device)
