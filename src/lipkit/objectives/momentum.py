"""The momentum (EMA) copy of a model that objectives keep (TCL's momentum encoders, RS-M-CLIP's and BYOL's
teachers): made once from the model, then moved after every optimiser step as ξ ← m·ξ + (1−m)·θ.

The trainer calls an objective's `bind_model(model)` before training (its return value, the copy, is the
model the momentum inputs of train.inputs run) and `after_step(model)` after each optimiser step (not
after a skipped, non-finite one). The copy is a submodule of the objective, so it is saved with the
training state and restored on resume.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, buffers: bool = True) -> None:
    """ξ ← m·ξ + (1−m)·θ over the parameters; the buffers (BatchNorm statistics) copied when `buffers`.
    Locked parameters (no gradient) are skipped: they never change, so the copy's stay equal to them."""
    for xi, theta in zip(teacher.parameters(), student.parameters(), strict=True):
        if theta.requires_grad:
            xi.lerp_(theta.detach(), 1 - momentum)
    if buffers:
        for xi, theta in zip(teacher.buffers(), student.buffers(), strict=True):
            xi.copy_(theta)
