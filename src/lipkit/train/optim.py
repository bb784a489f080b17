"""AdamW parameter groups and the learning-rate schedule of the Trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lipkit.config import TrainConfig


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


@dataclass(frozen=True)
class Schedule:
    """The run's length in steps, its time budget, and the learning rate along the way."""

    total: int  # steps
    warm: float  # the part of the run spent warming up
    budget: float  # seconds of training time (0: none)
    cfg: TrainConfig

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
        total = max(1, int(cfg.epochs * steps_per_epoch))
        return cls(total, min(cfg.warmup_steps, total - 1) / total, cfg.max_minutes * 60, cfg)

    def progress(self, step: int, seconds: Callable[[], float]) -> float:
        """Fraction of the run done: by steps, or by training time (`seconds()`) when the budget ends first."""
        return max(step / self.total, seconds() / self.budget) if self.budget else step / self.total

    def lr(self, step: int, progress: float) -> float:
        decay = max(0.0, progress - self.warm) / (1 - self.warm)
        return self.cfg.lr * lr_factor(step, decay, self.cfg.warmup_steps, self.cfg.min_lr_ratio)

    def stops_early(self, step: int, seconds: Callable[[], float]) -> bool:
        """The time budget ends the run before its last step."""
        return step < self.total and self.progress(step, seconds) >= 1.0

    def every(self, n: int, step: int) -> bool:
        """Every `n` steps (0: never), short of the last (the end of the run has its own eval and save)."""
        return bool(n) and step % n == 0 and step < self.total
