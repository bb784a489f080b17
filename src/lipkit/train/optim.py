"""AdamW parameter groups and the learning-rate schedule of the Trainer."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Weight decay on matrices only (no decay on biases, norms, embeddings or the logit scale); frozen
    parameters left out; parameters under a prefix in `lr_scales` get that multiple of the learning rate."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((s for prefix, s in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)
        groups.setdefault((p.ndim >= 2 and "embedding" not in name, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), ps in sorted(groups.items())
    ]


def lr_factor(step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` as `progress` goes 0 → 1."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
