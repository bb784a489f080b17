"""A dispatch mode that watches every tensor an op creates: the largest one (elements) and the peak of
live bytes of the storages ops create (each counted from its op until it is freed). Shared by the
SigLIP ring's memory test (tests/test_local_losses.py) and its benchmark (bench/bench_ring.py)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    """The most elements of any tensor an op creates (forward and backward alike) and the peak of live
    bytes of the storages ops create (each counted from its op until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = self.now = self.peak = 0
        self.live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            self.largest = max(self.largest, t.numel())
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() and key not in self.live:
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)
