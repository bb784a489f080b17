"""The Trainer's AdamW: on a CPU, PyTorch's fused kernel called directly, without `torch.optim`.

Why: constructing any `torch.optim` optimizer imports `torch._dynamo` (`Optimizer.add_param_group` is
wrapped in `torch._disable_dynamo`, and `Adam.step` calls `torch._dynamo.graph_break()`), which costs
~150 MB of resident memory in every training process: 40 % of the tiny preset's saved activations at
batch 128 in bf16 (docs/benchmarks.md, "Issue 20: training memory"). `FusedAdamW` makes the calls
`torch.optim.AdamW(..., fused=True).step()` makes — `torch._foreach_add_` on the step counts, then
`torch._fused_adamw_` per device and dtype (under FSDP, shards apart from replicated parameters) — so
the parameters and moments are bitwise the same (tests/test_adamw.py), and it keeps the state in the
same layout: `state_dict()` and `load_state_dict()` read and write
`torch.optim.AdamW`'s format, so checkpoints move between the two either way.

What it leaves out (the Trainer uses none of it): AMSGrad, `maximize`, gradient scaling and inf
checks (`grad_scale`/`found_inf`), tensor learning rates, closures, hooks, sparse gradients. On CUDA
the Trainer keeps `torch.optim.AdamW(fused=True)`; on other devices, torch's default implementation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

# the hyper-parameters torch.optim.AdamW(fused=True) keeps in each group: the state dict carries them
_TORCH_GROUP = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": True,
}


class FusedAdamW:
    """AdamW (decoupled weight decay) over parameter groups, one fused kernel call per device and dtype."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        self.defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, **_TORCH_GROUP}
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        seen: set[int] = set()
        for group in groups:
            params = list(group["params"])
            if any(id(p) in seen for p in params):
                raise ValueError("a parameter appears in more than one optimizer group")
            seen.update(id(p) for p in params)
            # torch's order of keys: the group's own, then the defaults it lacks
            self.param_groups.append(
                {**group, "params": params} | {k: v for k, v in self.defaults.items() if k not in group}
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if set_to_none:
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = None
        elif grads:
            for grad in grads:
                grad.detach_().requires_grad_(False)
            torch._foreach_zero_(grads)

    def _moments(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state.get(p)
        if not state:  # as torch.optim.Adam._init_group with fused=True: the step count on p's device
            state = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return state

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_kind: dict[tuple[torch.device, torch.dtype, bool], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("FusedAdamW does not support sparse gradients")
                    # under FSDP, shards (DTensors) apart from replicated parameters (a caption decoder
                    # beside sharded towers): one fused call cannot mix them (named, not imported: importing
                    # torch.distributed.tensor costs memory in every process); without FSDP, torch's calls
                    sharded = type(p).__name__ == "DTensor"
                    by_kind.setdefault((p.device, p.dtype, sharded), []).append(p)
            beta1, beta2 = group["betas"]
            for params in by_kind.values():
                states = [self._moments(p) for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(
                    params,
                    [p.grad for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [],
                    steps,
                    amsgrad=False,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                    grad_scale=None,
                    found_inf=None,
                )

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim.Optimizer.state_dict`'s layout: parameters numbered across the groups in order."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            packed = {k: v for k, v in group.items() if k != "params"}
            groups.append({**packed, "params": [index[id(p)] for p in group["params"]]})
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer.load_state_dict`: the saved hyper-parameters replace the groups' (the
        parameters stay), moments move to their parameter's dtype and device, step counts to float32."""
        saved = copy.deepcopy(state_dict["param_groups"])
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups, strict=True)
        ):
            raise ValueError("the loaded state has a different number of groups or parameters per group")
        by_index = {
            i: p
            for s, g in zip(saved, self.param_groups, strict=True)
            for i, p in zip(s["params"], g["params"], strict=True)
        }
        self.state = {}
        for key, entries in state_dict["state"].items():
            p = by_index[int(key)]
            self.state[p] = {name: _like_param(name, value, p) for name, value in entries.items()}
        self.param_groups = [
            {**s, "params": g["params"]} for s, g in zip(saved, self.param_groups, strict=True)
        ]


def _like_param(name: str, value: Any, p: torch.Tensor) -> torch.Tensor:
    """A loaded state entry as the fused kernel takes it: the step count a float32 tensor on p's device
    (older checkpoints may hold a number), moments in p's dtype on p's device."""
    if name == "step":
        return torch.as_tensor(value).to(dtype=torch.float32, device=p.device)
    return value.to(dtype=p.dtype if p.is_floating_point() else value.dtype, device=p.device)


def adamw(
    groups: list[dict[str, Any]], lr: float, device: torch.device, betas: tuple[float, float], eps: float
) -> FusedAdamW | torch.optim.AdamW:
    """The Trainer's optimizer (weight decay per group): `FusedAdamW` on a CPU, `torch.optim.AdamW`
    with the fused kernel on CUDA, torch's default implementation elsewhere."""
    if device.type == "cpu":
        return FusedAdamW(groups, lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda" or None)
