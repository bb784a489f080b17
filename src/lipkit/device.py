"""Which torch device a command runs on."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from lipkit.errors import UserError


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this process's GPU (cuda:local_rank) when there is one, else the CPU; otherwise the named
    device, checked (a CUDA device without a GPU is a clear error, not a crash later)."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:N.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device '{device}' was asked for but no CUDA GPU is available; use --device cpu.")
    return dev


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16). Elsewhere bf16 autocast
    is emulated and slower than fp32: the demo's image tower, forward and backward of 128 images on an
    AVX2-only EPYC, 24.5 s in bf16 against 3.5 s in fp32. Unknown (no /proc/cpuinfo): assumed native."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", flags) is not None


def use_bf16(precision: str, device_type: str) -> bool:
    """Whether training or evaluation asked for bf16 (`precision`) runs under bf16 autocast: yes on GPUs and
    on CPUs that compute bf16 natively; on other CPUs fp32 (launch.run_training says so once)."""
    return precision == "bf16" and (device_type != "cpu" or cpu_has_bf16())
