"""Tip-Adapter's cache model (Zhang et al., 2022, "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification").

The K·C shots' normalised image features are the keys F (N × D), their one-hot labels the values L (N × C).
A test image's normalised feature x is scored against the classes by

    logits = t · x·Wᵀ + α · exp(−β · (1 − x·Fᵀ)) · L

where W holds the zero-shot classifier's class embeddings and t is the model's logit scale (the paper
writes 100, CLIP's). α = β = 1 by default; the paper searches both per dataset on a validation split. Tip-Adapter itself trains nothing; Tip-Adapter-F
(lipkit adapt --method tip-f) fine-tunes the keys F with the cross-entropy of these logits on the shots,
the values and both towers frozen.

The cache knows its classes by name and column: in `lipkit eval` it adds its term to the zero-shot scores
of that column, to the classes it holds (a class not in the cache gets the zero-shot score alone).

Not implemented: the paper's augmented keys (the mean feature of 10 random crops of each shot, here one
view), its search of α and β on a validation split, and Tip-F's cosine schedule (full-batch AdamW here).
"""

from __future__ import annotations

import torch
from torch import nn


class TipCache(nn.Module):
    def __init__(
        self, dim: int, labels: list[int], classes: list[str], alpha: float = 1.0, beta: float = 1.0
    ):
        super().__init__()
        self.classes, self.alpha, self.beta = list(classes), alpha, beta
        self.keys = nn.Parameter(torch.zeros(len(labels), dim))
        values = torch.zeros(len(labels), len(classes))
        values[torch.arange(len(labels)), torch.tensor(labels, dtype=torch.long)] = 1.0
        self.register_buffer("values", values)

    def cache_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_cache): α · exp(−β(1 − x·Fᵀ)) · L for normalised image features x (B, D)."""
        affinity = x @ self.keys.to(x.dtype).t()
        return self.alpha * torch.exp(-self.beta * (1 - affinity)) @ self.values.to(x.dtype)

    def logits(
        self, x: torch.Tensor, class_features: torch.Tensor, scale: torch.Tensor, classes
    ) -> torch.Tensor:
        """(B, C) Tip-Adapter logits over `classes` (names), whose zero-shot rows are `class_features`."""
        index = {c: i for i, c in enumerate(self.classes)}
        have = [(j, index[str(c)]) for j, c in enumerate(classes) if str(c) in index]
        out = scale * x @ class_features.t()
        if have:
            cols, rows = zip(*have, strict=True)
            out[:, list(cols)] += self.cache_logits(x)[:, list(rows)]
        return out
