"""torchrun / DDP setup and global negatives.

`torchrun --nproc-per-node N -m lipkit train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` joins
the process group (nccl for CUDA tensors and gloo for the small CPU ones on GPUs, gloo on CPUs) and
every rank then trains on its own share of each global batch, which the data sources hand it.

Global negatives: each rank's per-sample features are all-gathered *with gradient*
(`torch.distributed.nn.functional.all_gather`), so every rank evaluates the loss on the whole global
batch. The backward of that all-gather sums, onto each rank's slice, the gradients of all W ranks'
(identical) losses, i.e. W·∂L/∂x_r; averaging parameter gradients over W then leaves exactly the
single-process gradient of L on the global batch.

Local loss (`train.local_loss`, the objectives that declare a `local_form`; train/local_losses.py):
each rank computes only its share of the loss — its own rows against the gathered other side, or
SigLIP's ring of b × b blocks passed from rank to rank (`ring_exchange`). The mean of the ranks' local
losses is the global loss; the gradients again match. Gradients are averaged over ranks by
train/reducer.py (buckets started during the backward).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lipkit.errors import UserError
from lipkit.objectives import OBJECTIVES
from lipkit.train.inputs import INPUTS

_JOINED_HERE = False  # whether init() created the process group (then it is left at exit)
_RUN_ENDED = False  # the last training run of this process ended on every rank (see run_ended)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the process group when launched by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    global _JOINED_HERE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        _JOINED_HERE = True
        atexit.register(_leave)
        if torch.cuda.is_available():  # nccl for CUDA tensors; the small CPU ones (flags, clock) by gloo
            torch.cuda.set_device(local)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local)


def run_ended(ended: bool) -> None:
    """Mark a training run as begun (False) or ended on this rank after its last collective (True)."""
    global _RUN_ENDED
    _RUN_ENDED = ended


def _leave() -> None:
    """At exit, leave the process group init() joined, together — a barrier (no rank still owes a
    collective), then destroy it — when the last run ended normally (a rank that failed mid-run exits at
    once, so that torchrun stops the others). A rank that exits with its gloo pairs and store threads
    alive can abort in their destructors (`terminate called without an active exception`) while its peers
    are still closing. The group lives until then, so several runs in one process (lipkit.fit) share it."""
    if _JOINED_HERE and _RUN_ENDED and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and hands each rank
    the rows it contributed (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping the autograd graph (gradients flow back to each rank's slice)."""
    return _GatherWithGrad.apply(x)


def gather_inputs(inputs: dict[str, torch.Tensor], d: Dist, batch: int) -> dict[str, torch.Tensor]:
    """Make an objective's inputs global, each as the registry (train.inputs.INPUTS) says: features
    gathered with gradient, ints, bools and frozen features plainly, caption owners offset by rank."""
    out = dict(inputs)
    for name, entry in INPUTS.items():  # the registry's order: the same collectives on every rank
        if name not in inputs:
            continue
        x, how = inputs[name], entry.gather
        if how == "grad":
            out[name] = gather(x)
        elif how == "plain":
            out[name] = _gather_plain(x)
        elif how == "owner":
            out[name] = _gather_plain(x + d.rank * batch)
    return out


def _gather_plain(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def ring_exchange(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One step round the ring of ranks, without gradient: send each tensor to the next rank, (r+1) mod W,
    and return the tensors of the same shapes that the previous rank, (r−1) mod W, sent (point-to-point
    isend/irecv, one batch; gloo or nccl)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    received = [torch.empty_like(x) for x in tensors]
    ops = [dist.P2POp(dist.isend, x.contiguous(), (rank + 1) % world, tag=i) for i, x in enumerate(tensors)]
    ops += [dist.P2POp(dist.irecv, x, (rank - 1) % world, tag=i) for i, x in enumerate(received)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return tuple(received)


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average gradients over ranks with one flattened all-reduce (DDP's arithmetic, without its
    bucketing/overlap; plain enough to compose with gradient caching and local losses)."""
    # parameters the loss did not reach have no gradient on any rank (every rank runs the same graph):
    # leave them without one, as a single process would (a zero would still get AdamW's weight decay)
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        p.grad = g


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over the ranks (no gradient)."""
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: torch.Tensor) -> torch.Tensor:
    t = flag.to(torch.int32).reshape(1).cpu()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def sync_step(signum: int | None, seconds: float) -> tuple[int | None, float]:
    """After every step, one tiny all-reduce: a signal seen by any rank stops all ranks after the same
    step, and every rank reads the same training clock, so the time budget ends the run at the same
    step everywhere and the learning-rate schedule, which follows that clock, stays identical across
    ranks. The clock is the smallest of the ranks' own: rank 0 leaves its evaluation time out, the
    others count the time they spent waiting for it as training."""
    t = torch.tensor([float(signum or 0), -seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # max of −seconds = −(min of seconds)
    return int(t[0]) or None, -float(t[1])


def check_batch_split(batch_size: int, world: int) -> None:
    """The global batch must split evenly over the ranks (checked before any data is read)."""
    if batch_size % world:
        raise UserError(
            f"train.batch_size={batch_size} is not divisible by the {world} ranks; use a multiple of {world}."
        )


def check_scaling(cfg: Any, needs: set[str], d: Dist) -> None:
    """Reject impossible combinations before the first step."""
    check_batch_split(cfg.batch_size, d.world)
    if cfg.local_loss and getattr(OBJECTIVES.get(cfg.objective), "local_form", None) is None:
        have = ", ".join(name for name, cls in OBJECTIVES.items() if getattr(cls, "local_form", None))
        raise UserError(
            f"train.local_loss needs an objective with a local form ({have}) and '{cfg.objective}' has "
            "none; unset train.local_loss or choose one of those."
        )
    if d.enabled and cfg.strategy == "fsdp" and any(name.startswith("momentum_") for name in needs):
        raise UserError(
            f"Objective '{cfg.objective}' keeps a momentum copy of the model, which train.strategy=fsdp does "
            "not shard; use train.strategy=ddp."
        )
    uncached = sorted(name for name in needs if INPUTS[name].cache is None)
    if cfg.grad_cache_chunk and uncached:
        raise UserError(
            f"train.grad_cache_chunk cannot cache the objective '{cfg.objective}' input "
            f"{', '.join(uncached)}; unset train.grad_cache_chunk."
        )
