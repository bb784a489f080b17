"""Which torch device a command runs on."""

from __future__ import annotations

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
