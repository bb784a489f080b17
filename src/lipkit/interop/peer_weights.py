"""Reading peer weight files (safetensors, or a torch file with weights_only) and building the lipkit
model and tokenizer they describe; shared by open_clip.py, hf.py and hf_dual.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tokenizers import Tokenizer

from lipkit.errors import UserError, import_optional
from lipkit.interop.clip_bpe import INSTALL_HINT
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional package or end in a UserError that says how to install it."""
    return import_optional(
        module,
        lambda _: f"{purpose} needs the '{module}' package, which is not installed; run {INSTALL_HINT}.",
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pt/.bin/.pth file read with `torch.load(weights_only=True)`.

    Training checkpoints that wrap the weights (`{"state_dict": ...}`) and DDP's `module.` prefix are
    unwrapped; floating tensors come back as float32.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"Checkpoint file '{p}' does not exist; pass the path of a .safetensors or .pt file.")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: object = load_file(str(p))
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"'{p}' is not a readable safetensors file ({e}); re-export or re-download it."
            ) from e
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(
                f"'{p}' could not be read as a weights-only state dict ({type(e).__name__}); "
                "save the weights with torch.save(model.state_dict(), ...) or as .safetensors."
            ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{p}' does not hold a state dict of tensors; pass a model's state dict file.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); re-save the model directory.") from e


def read_hf_weights(directory: Path, saved_by: str = "CLIPModel.save_pretrained") -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face model directory (model.safetensors, sharded or not, or
    pytorch_model.bin)."""
    index = read_json(directory / "model.safetensors.index.json")
    if index is not None:  # sharded
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(read_state_dict(directory / shard))
        return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name)
    raise UserError(
        f"'{directory}' has no model.safetensors (or pytorch_model.bin); pass a directory written by "
        f"{saved_by}."
    )


def build_model(
    spec: ModelSpec, state: dict[str, torch.Tensor], source: str, fix: str, max_logit_scale: float = 100.0
) -> DualEncoder:
    """A DualEncoder with exactly these weights; a state dict that does not fit the spec is a UserError."""
    with torch.device("meta"):
        model = DualEncoder(spec, max_logit_scale=max_logit_scale)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            what = f"{k} has shape {tuple(state[k].shape)}, expected {expected[k]}"
        elif missing:
            what = f"{len(missing)} weight(s) are missing, e.g. {missing[0]}"
        else:
            what = f"{len(unexpected)} weight(s) are not used, e.g. {unexpected[0]}"
        raise UserError(f"The weights of {source} do not fit ({what}); {fix}.")
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    if any(b.is_meta for b in model.buffers()):
        # buffers outside the state dict (an HF text tower's position and token-type ids) stay meta tensors,
        # which compute garbage: build the model for real instead
        model = DualEncoder(spec, max_logit_scale=max_logit_scale)
        model.load_state_dict(state)
    return model.eval()


def tokenizer_from_dir(directory: Path) -> Tokenizer | None:
    """The tokenizer stored in a model directory, or None when there is none.

    A CLIP BPE vocabulary (Hugging Face `tokenizer.json`, `vocab.json` + `merges.txt`, or one written
    by lipkit) is rebuilt as OpenCLIP's tokenizer; any other `tokenizer.json` is used as it is when
    it has lipkit's special tokens.
    """
    from lipkit.interop.clip_bpe import build_clip_tokenizer, is_clip_vocab, vocab_and_merges_from_hf
    from lipkit.text.tokenizer import TextTokenizer

    if not directory.is_dir():
        return None
    try:
        found = vocab_and_merges_from_hf(directory)
    except (OSError, ValueError) as e:
        raise UserError(
            f"The tokenizer files in '{directory}' cannot be read ({e}); re-save the tokenizer."
        ) from e
    if found is not None and is_clip_vocab(found[0]):
        return build_clip_tokenizer(*found)
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
        TextTokenizer(tok, context_length=8)  # has the special tokens lipkit needs
    except UserError:
        return None
    except Exception as e:
        raise UserError(f"'{path}' is not a readable tokenizers file ({e}); re-save the tokenizer.") from e
    return tok


def image_processor_config(spec: ModelSpec, **extra: Any) -> dict[str, Any]:
    """A Hugging Face `CLIPImageProcessor` config for the model's input: resize the short side to its
    size (bicubic), centre crop, scale to [0, 1], normalise with its mean/std (`extra`: more keys)."""
    s = spec.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        **extra,
        "do_resize": True,
        "size": {"shortest_edge": s},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
        "do_convert_rgb": True,
    }
