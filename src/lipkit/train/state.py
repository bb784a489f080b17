"""Everything a bitwise-exact resume needs, as safetensors-friendly tensors plus JSON metadata:
optimizer moments and hyper-parameters, and every RNG the run draws from (Python, NumPy, torch CPU,
CUDA, and the augmentation generator). The data position needs nothing extra: batch order is a
function of (seed, epoch) and the step number locates the batch within it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def optimizer_state(opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`opt`: a torch.optim optimizer or train.adamw.FusedAdamW (the same state-dict layout)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entries in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entries)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.augment": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def load_rng_state(
    generator: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.augment"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, keys, gauss = meta["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys_np, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys_np, dtype=np.uint32), pos, has_gauss, cached))
