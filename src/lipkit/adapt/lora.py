"""LoRA (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on a tower's linear weights.

Each adapted weight W (out, in) is frozen and read as

    W' = W + (α / r) · B A,   A (r, in) ~ Kaiming-uniform,  B (out, r) = 0,

so training starts from the checkpoint's function and only A and B (r · (in + out) numbers per weight)
learn. It is a parametrization (torch.nn.utils.parametrize): every read of the weight — `F.linear` on a
Linear, the packed attention projection `in_proj_weight`, the MLP's fused activation-projection — sees W',
so no forward changes. `merge` writes W' into the weight and removes A and B: the merged model is an
ordinary one, computing what the unmerged one computes (to float rounding), which every export carries.

Which weights: every `nn.Linear` weight and lipkit's attention `in_proj_weight` inside the chosen towers —
the attention and MLP projections of lipkit's ViT and text transformer, and the linear layers of a Hugging
Face text encoder (query, key, value, dense). Not adapted: embeddings, norms, biases, the towers' output
projections (parameters, not layers), the input projections of a `nn.MultiheadAttention` (an attentional
pooler's: its `out_proj` is adapted), and convolutions (a timm image tower is refused). A tower's cache of
text features (the locked Hugging Face tower's, by token ids) is emptied when branches are added and when
they are merged, so no feature of the old weights is served. Not implemented from the paper: dropout on the
LoRA branch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipkit.errors import UserError
from lipkit.models.transformer import Attention


class LoRADelta(nn.Module):
    """The parametrization W ↦ W + (α / r) B A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def lora_targets(tower: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight LoRA adapts in `tower` (module docstring)."""
    out: list[tuple[nn.Module, str]] = []
    for module in tower.modules():
        if isinstance(module, nn.Linear):
            out.append((module, "weight"))
        elif isinstance(module, Attention):
            out.append((module, "in_proj_weight"))
    return out


def add_lora(towers: list[nn.Module], rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze every parameter of the towers and give each target weight a LoRA branch; the new trainable
    parameters (A and B of each). `towers`: modules whose linear weights are adapted."""
    if rank < 1:
        raise UserError(f"The LoRA rank must be 1 or more, not {rank}.")
    trainable: list[nn.Parameter] = []
    for tower in towers:
        tower.requires_grad_(False)
        targets = lora_targets(tower)
        if not targets:
            raise UserError(
                f"The {type(tower).__name__} tower has no linear weights for LoRA to adapt; adapt the other tower."
            )
        _clear_cache(tower)
        for module, name in targets:
            weight = getattr(module, name)
            delta = LoRADelta(weight.shape[0], weight.shape[1], rank, alpha).to(weight.device)
            parametrize.register_parametrization(module, name, delta)
            trainable += [delta.A, delta.B]
    return trainable


def merge(towers: list[nn.Module]) -> int:
    """Write W + (α/r) B A into every adapted weight and remove the branches (other parametrizations are
    left alone); how many were merged."""
    merged = 0
    for tower in towers:
        for module in list(tower.modules()):
            if not parametrize.is_parametrized(module):
                continue
            for name in list(module.parametrizations.keys()):
                chain = module.parametrizations[name]
                if len(chain) == 1 and isinstance(chain[0], LoRADelta):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                    merged += 1
        _clear_cache(tower)
    return merged


def _clear_cache(tower: nn.Module) -> None:
    """Empty a tower's feature cache (models.hf_text keeps one, by token ids, while its encoder is locked)."""
    cache = getattr(tower, "_cache", None)
    if cache is not None:
        cache.clear()
