"""FSDP (`train.strategy=fsdp`): parameters, gradients and AdamW moments sharded across ranks with
PyTorch's own `fully_shard` (FSDP2), instead of every rank holding all of them.

Each trainable transformer block of either tower, each tower and each lexicon head becomes one FSDP
unit: its parameters are all-gathered just before its forward (and again for its backward) and
gradients are reduce-scattered (averaged over ranks) after it. Frozen parameters (a locked tower) are
left out of the shards and stay replicated. The model's root parameters (the logit scale and bias) and
an objective's own parameters stay plain tensors, averaged with one all-reduce like the DDP path.
Global negatives work exactly as with DDP: the loss sees the gathered features of the whole batch.

Whole-model operations that need every weight at once — evaluation, writing a checkpoint, gradient
clipping, resuming — go through the helpers below, which are collectives: every rank calls them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.hf_text import HFTextTower
from lipkit.train.distributed import average_gradients


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _shard(module: nn.Module) -> None:
    frozen = {p for p in module.parameters() if not p.requires_grad}
    fully_shard(module, ignored_params=frozen or None)


def _blocks(unit: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a tower (none for a lexicon head)."""
    if isinstance(unit, HFTextTower):
        layers = getattr(getattr(unit.encoder, "encoder", None), "layer", None)
        return list(layers) if layers is not None else []
    return list(getattr(getattr(unit, "transformer", None), "resblocks", []))


def shard_model(model: DualEncoder) -> None:
    """Turn the model's towers and heads into FSDP units, in place (before the optimizer is built)."""
    units = [model.visual, model.text]
    if model.has_lexicon:
        units += [model.image_lexicon, model.text_lexicon]
    for unit in units:
        if not _trainable(unit):
            continue  # a fully locked tower stays replicated: nothing to shard or reduce
        for block in _blocks(unit):
            if _trainable(block):
                _shard(block)
        _shard(unit)
    # LexLIP's masked stage calls these directly: they gather the weights as forward does
    if model.has_lexicon:
        for head in (model.image_lexicon, model.text_lexicon):
            if _trainable(head):
                register_fsdp_forward_method(head, "token_logits")
                register_fsdp_forward_method(head, "pooled_logits")


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a shard, the tensor itself otherwise)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor (e.g. an AdamW moment read from a checkpoint) sharded like `param`."""
    if isinstance(param, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def average_replicated(params: list[torch.Tensor]) -> None:
    """All-reduce-average the gradients of the parameters FSDP does not own (root and objective ones)."""
    average_gradients([p for p in params if not isinstance(p, DTensor)])


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (shards summed across ranks, replicated ones counted once), then
    scaled down to `max_norm` like `torch.nn.utils.clip_grad_norm_`. Returns the norm before clipping."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            sharded += p.grad.to_local().double().pow(2).sum().cpu()
        else:
            replicated += p.grad.double().pow(2).sum().cpu()
    dist.all_reduce(sharded)
    norm = (sharded + replicated).sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if max_norm < float("inf") and coef < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device).item())
    return norm


def unsharded_copy(model: DualEncoder, keep: bool) -> DualEncoder | None:
    """A plain (unsharded) copy of the model with every weight, on the model's device: what evaluation
    and checkpoint writing read. Every rank must call it (the gathering is a collective); only where
    `keep` is true (rank 0) is the copy built — elsewhere None."""
    state = {k: full(v).detach() for k, v in model.state_dict().items()}
    if not keep:
        return None
    device = model.logit_scale.device
    with torch.random.fork_rng(devices=[]):  # building draws an init; the run's RNG must not move
        plain = DualEncoder(model.spec, max_logit_scale=model.max_logit_scale).to(device)
    trained = dict(model.named_parameters())
    for name, p in plain.named_parameters():  # keep the locks (LiT) of the trained model
        p.requires_grad_(trained[name].requires_grad)
    plain.load_state_dict(state)
    if isinstance(model.text, HFTextTower):
        plain.text._cache = copy.copy(model.text._cache)  # the locked tower's cached captions
    return plain.train(model.training)


def shard_optimizer_state(opt: Any) -> None:
    """Cut the full optimizer moments a checkpoint holds down to this rank's shards of their parameters."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for name, value in st.items():
                if torch.is_tensor(value):
                    st[name] = like(value, p)
