"""Gradient averaging over ranks in buckets that start while the backward pass is still running
(what PyTorch DDP's reducer does; written out here so that it composes with gradient caching, local
losses and objectives that own parameters).

Parameters are grouped into buckets of about `train.bucket_cap_mb` MiB. A hook on each parameter
(`register_post_accumulate_grad_hook`) marks it ready when autograd has written its gradient; when the
last parameter of a bucket is ready, the bucket's gradients are flattened into one buffer and an
asynchronous all-reduce starts on it, so communication overlaps the rest of the backward. `finish`
starts the buckets that never completed (parameters the loss did not reach this step), waits for all,
and writes back the averages. Parameters without a gradient on this step keep none (every rank runs the
same graph, so it is the same set everywhere), as a single process leaves them.

Bucket order: at first, reverse definition order (the output end of a network is differentiated first);
after the first step the buckets are rebuilt in the order the gradients were ready in its armed backward
pass (rank 0's order, sent to every rank), so that each bucket completes as early as possible — DDP's
"rebuild buckets". Buckets start strictly in index order, as DDP's do: a complete bucket waits for the
ones before it, so the buckets' all-reduces go out in the same order on every rank. Like DDP, this
relies on every rank running the same graph in the same order (the blocking collectives inside the
backward — the gathers of global negatives — must meet the bucket all-reduces at the same points).
The bucket order is part of the training state, so a resumed run buckets (and so sums) exactly as the
run it continues.

Only a backward pass run with the reducer `armed` starts buckets early: the step's one backward, or
with gradient caching (several backward passes a step) the last chunk's, after which every gradient is
complete; parameters it does not reach (the logit scale, whose gradient came in an earlier pass) start
in `finish`. With `bucket_cap_mb = 0` every gradient goes in one bucket, which starts when the last
gradient is written (or in `finish`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _buckets(params: Sequence[torch.Tensor], cap_bytes: float) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if out[-1] and size + nbytes > cap_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return [b for b in out if b]


class BucketReducer:
    """Averages the gradients of `params` over the ranks of the default process group (see the module
    docstring). Call `arm()` before a step's only backward pass and `finish()` after the backward."""

    def __init__(self, params: Sequence[torch.Tensor], world: int, bucket_cap_mb: float = 25.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.cap = bucket_cap_mb * 2**20 if bucket_cap_mb > 0 else float("inf")
        self.world = world
        self._build(list(reversed(self.params)))
        self.armed = False
        self.ready_order: list[torch.Tensor] = []  # this step's, for rebuilding the buckets
        self._recorded: set[int] = set()
        self.rebuilt = False
        self.early = 0  # buckets started during the last backward (how much overlapped)
        self._handles: dict[int, tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = {}
        self._pending: list[int] = []
        self._next = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    def close(self) -> None:
        """Remove the hooks (a growth replaces the reducer: the old one must not outlive its parameters)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.params = [], []

    def _build(self, order: list[torch.Tensor]) -> None:
        self.buckets = _buckets(order, self.cap)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}

    def arm(self) -> None:
        """The next backward pass is the step's last: start each bucket as soon as it is complete."""
        self.armed = True
        self.early = 0
        self._pending = [len(b) for b in self.buckets]
        self._next = 0  # the next bucket to start

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        if not self.rebuilt and id(p) not in self._recorded:
            self._recorded.add(id(p))
            self.ready_order.append(p)
        i = self.bucket_of[id(p)]
        self._pending[i] -= 1
        # buckets start strictly in index order (as DDP's): a complete bucket waits for those before it,
        # so every rank issues the same all-reduces in the same order whatever order hooks fire in
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._start(self._next)
            self._next += 1
            self.early += 1

    def _start(self, i: int) -> None:
        params = [p for p in self.buckets[i] if p.grad is not None]
        if not params:
            return
        flat = _flatten_dense_tensors([p.grad for p in params])
        self._handles[i] = (dist.all_reduce(flat, async_op=True), flat, params)

    def finish(self) -> None:
        """Start what has not started (in bucket order, the same on every rank), wait, write back."""
        self.armed = False
        for i in range(self._next, len(self.buckets)):
            self._start(i)
        self._next = 0
        for work, flat, params in self._handles.values():
            work.wait()
            flat /= self.world
            grads = [p.grad for p in params]
            for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
                p.grad.copy_(g)
        self._handles = {}
        if not self.rebuilt and self.ready_order:
            self._rebuild()

    def order(self) -> list[int]:
        """The buckets' parameter order, as indices into `params` (saved with the training state)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        return [index[id(p)] for b in self.buckets for p in b]

    def load_order(self, order: list[int]) -> None:
        """Bucket as a saved `order()` said, from the first step on (a resumed run sums as before)."""
        if sorted(order) != list(range(len(self.params))):
            return  # another model: keep rebuilding from this run's first step
        self._build([self.params[i] for i in order])
        self.rebuilt = True

    def _rebuild(self) -> None:
        """After the first step: buckets in the order the gradients were ready — rank 0's order, sent to
        every rank, so that all of them bucket alike (as DDP does)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        first = [index[id(p)] for p in self.ready_order]
        seen = set(first)
        order = first + [i for i in reversed(range(len(self.params))) if i not in seen]
        shared = torch.tensor(order, dtype=torch.int64, device=self.params[0].device)
        dist.broadcast(shared, src=0)
        self._build([self.params[i] for i in shared.tolist()])
        self.rebuilt = True
        self.ready_order, self._recorded = [], set()
