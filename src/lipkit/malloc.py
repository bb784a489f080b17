"""glibc malloc settings for CPU tensor work: keep freed memory for the next step.

PyTorch's CPU tensors come straight from `malloc`. With glibc's defaults a freed block of more than
128 KiB–32 MiB (its threshold adapts) goes back to the kernel — unmapped, or trimmed off the top of
the heap — so the next training step gets fresh pages and takes a page fault for every 4 KiB it
touches. The tiny preset at batch 128 faulted ~70,000 times per step (~280 MB of zeroed pages). Three
`mallopt` settings keep that memory in the process instead:

- `M_MMAP_THRESHOLD` = 32 MiB (glibc's maximum): blocks up to 32 MiB come from the heap, not `mmap`;
- `M_TRIM_THRESHOLD` = 1 GiB: freed memory at the top of the heap is kept up to 1 GiB;
- `M_TOP_PAD` = 64 MiB: the heap grows in larger steps (fewer `brk` calls).

The memory is reused, not added: peak RSS of the tiny preset's training moved by < 2 % (within run
to run noise); after its peak the process keeps up to 1 GiB of freed heap instead of returning it,
and with very varied tensor shapes the heap can fragment. So only CPU training, evaluation and
embedding apply them (the Trainer, `run_eval`, `embed`), not the server or the data tools.
Measured on the tiny preset, bf16, batch 128, 2 cores: page faults per step ~58,000 → 0, step
time −10 % (docs/benchmarks.md). Set once per process; any malloc setting in the environment
(`MALLOC_*_`, `GLIBC_TUNABLES` with glibc.malloc, a preloaded jemalloc/tcmalloc), or
`LIPKIT_MALLOC=default`, leaves the allocator alone. Other C libraries (musl, macOS, Windows):
nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc's environment-variable name for each setting: (mallopt parameter, value)
SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 << 20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 30),
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 64 << 20),
}


def as_environment() -> dict[str, str]:
    """The same settings as environment variables, for a process that is not lipkit's (a benchmark peer)."""
    return {name: str(value) for name, (_, value) in SETTINGS.items()}


_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True when glibc accepted them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("LIPKIT_MALLOC") == "default":
        return False
    if any(name in os.environ for name in (*SETTINGS, "MALLOC_ARENA_MAX")):
        return False  # the user tuned malloc themselves
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")
    ):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        getattr(libc, "gnu_get_libc_version")  # glibc only: musl's mallopt is a no-op  # noqa: B009
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = [mallopt(param, value) == 1 for param, value in SETTINGS.values()]  # every one tried
    _applied = all(accepted)
    return _applied
