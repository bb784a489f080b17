"""OpenCLIP checkpoints in and out.

lipkit's parameter names follow OpenCLIP, so the state dict is a rename: OpenCLIP keeps the text
tower at the top level (`token_embedding`, `transformer.resblocks...`, `ln_final`,
`text_projection`) where lipkit nests it under `text.`. The architecture comes from an OpenCLIP
model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`), read by open_clip_spec.py,
which refuses settings lipkit's towers do not implement (layer scale, attentional pooling, timm or
Hugging Face towers, ...) with the setting's name rather than converting them wrongly.

Reading and writing need only safetensors (and torch for .pt files); `open_clip` itself is used to
look architectures up by name and, in tests, to check parity.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.interop import refuse_existing
from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE, clip_tokenizer
from lipkit.interop.open_clip_spec import spec_from_open_clip
from lipkit.interop.peer_weights import build_model, read_state_dict, require, tokenizer_from_dir
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def read_arch(arch: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(model config, preprocess config, name) for an OpenCLIP architecture name or a config path.

    A path may be a model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`), an
    `open_clip_config.json` (`model_cfg` + `preprocess_cfg`), or a directory holding the latter.
    """
    raw = arch.removeprefix("local-dir:")
    path = Path(raw).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
        if not path.is_file():
            raise UserError(
                f"Directory '{raw}' has no {CONFIG_NAME}; pass an OpenCLIP model name or config JSON."
            )
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"OpenCLIP config '{path}' is not valid JSON ({e}); fix or regenerate it.") from e
        if isinstance(data, dict) and "model_cfg" in data:
            return data["model_cfg"], data.get("preprocess_cfg") or {}, path.parent.name
        if not isinstance(data, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(data):
            raise UserError(
                f"'{path}' is not an OpenCLIP model config (it needs embed_dim, vision_cfg and text_cfg); "
                "pass a file like open_clip/model_configs/ViT-B-32.json."
            )
        return data, {}, path.stem
    if raw.endswith(".json") or os.sep in raw:
        raise UserError(f"OpenCLIP config file '{raw}' does not exist; check the path or pass a model name.")
    open_clip = require("open_clip", f"Looking up the OpenCLIP architecture '{arch}'")
    name = raw.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None and name.endswith("-quickgelu"):  # any config with OpenAI's QuickGELU activation
        cfg = open_clip.get_model_config(name.removesuffix("-quickgelu"))
        if cfg is not None:
            cfg["quick_gelu"] = True
    if cfg is None:
        close = [m for m in open_clip.list_models() if m.lower().startswith(name.lower()[:5])][:5]
        raise UserError(
            f"Unknown OpenCLIP architecture '{arch}'; use a name from open_clip.list_models() "
            f"(e.g. {', '.join(close) or 'ViT-B-32'}) or the path of a model-config JSON."
        )
    return cfg, {}, name


def check_exportable(spec: ModelSpec, target: str) -> None:
    """Only lipkit's own transformer text tower has a counterpart in OpenCLIP's CLIP and HF's CLIPModel."""
    if spec.text_tower != "transformer":
        raise UserError(
            f"This checkpoint's text tower is a Hugging Face encoder (text_tower='{spec.text_tower}'), which "
            f"{target} cannot hold; export it with `lipkit export onnx` instead."
        )
    if spec.vision_stem != "patch":
        raise UserError(
            f"This checkpoint's image tower has a convolutional stem (vision_stem='{spec.vision_stem}'), which "
            f"{target} cannot hold; export it with `lipkit export onnx` instead."
        )
    if spec.lexicon_vocab:
        raise UserError(
            f"This checkpoint has LexLIP lexicon heads, which {target} cannot hold and a conversion would "
            "drop; keep the lipkit checkpoint for sparse search, or export the towers with `lipkit export onnx`."
        )


def open_clip_model_config(spec: ModelSpec, logit_bias: float | None = None) -> dict[str, Any]:
    """OpenCLIP's model config for a lipkit spec (CLIP class, argmax or first-end-token text pooling)."""
    check_exportable(spec, "OpenCLIP's CLIP model")
    text: dict[str, Any] = {
        "context_length": spec.context_length,
        "vocab_size": spec.vocab_size,
        "width": spec.text_width,
        "heads": spec.text_heads,
        "layers": spec.text_layers,
        "mlp_ratio": spec.mlp_ratio,
    }
    if spec.eot_id != spec.vocab_size - 1:  # CLIP's end token is the largest id; others pool at eos_id
        text.update(pool_type="eos", eos_id=spec.eot_id)
    cfg: dict[str, Any] = {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {
            "image_size": spec.image_size,
            "layers": spec.vision_layers,
            "width": spec.vision_width,
            "head_width": spec.vision_width // spec.vision_heads,
            "patch_size": spec.patch_size,
            "mlp_ratio": spec.mlp_ratio,
        },
        "text_cfg": text,
    }
    if spec.quick_gelu:
        cfg["quick_gelu"] = True
    if spec.logit_bias:
        cfg["init_logit_bias"] = -10.0 if logit_bias is None else logit_bias
    return cfg


def state_from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP `CLIP` (or `CustomTextCLIP`) state dict to lipkit's names."""
    out = {}
    for k, v in state.items():
        if k in ("attn_mask", "input_resolution", "context_length", "vocab_size"):
            continue  # buffers and metadata of old/OpenAI checkpoints
        if k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(())
        elif k.startswith(("visual.", "text.")):
            out[k] = v
        else:
            out["text." + k] = v
    return out


def state_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lipkit state dict to OpenCLIP `CLIP` names."""
    return {k.removeprefix("text."): v.detach().cpu().clone().contiguous() for k, v in state.items()}


def _adjacent_tokenizer(*places: Path) -> Tokenizer | None:
    for place in places:
        found = tokenizer_from_dir(place if place.is_dir() else place.parent)
        if found is not None:
            return found
    return None


def from_open_clip(
    arch: str, checkpoint: str | Path | dict[str, torch.Tensor], tokenizer: TextTokenizer | None = None
) -> tuple[DualEncoder, TextTokenizer]:
    """A lipkit model and tokenizer from an OpenCLIP architecture and state dict (file or dict).

    The tokenizer is a `tokenizer.json` beside the config or checkpoint when there is one (a model
    written by `to_open_clip`), else CLIP's BPE from OpenCLIP's bundled vocabulary.
    """
    cfg, preprocess, name = read_arch(arch)
    raw_tok = tokenizer.tok if tokenizer is not None else None
    if tokenizer is None and isinstance(checkpoint, str | Path):
        places = [Path(checkpoint).expanduser()]
        if Path(arch.removeprefix("local-dir:")).expanduser().exists():
            places.append(Path(arch.removeprefix("local-dir:")).expanduser())
        raw_tok = _adjacent_tokenizer(*places)
    if tokenizer is None and raw_tok is None:
        vocab = int((cfg.get("text_cfg") or {}).get("vocab_size", CLIP_VOCAB_SIZE))
        if vocab != CLIP_VOCAB_SIZE:
            raise UserError(
                f"OpenCLIP config '{arch}' has a {vocab}-token vocabulary, not CLIP's BPE ({CLIP_VOCAB_SIZE}); "
                "put the model's tokenizer.json beside the checkpoint."
            )
        raw_tok = clip_tokenizer()
    ctx = int((cfg.get("text_cfg") or {}).get("context_length", 77))
    tok = TextTokenizer(raw_tok, ctx)
    spec = spec_from_open_clip(cfg, preprocess, eot_id=tok.eot_id, arch=name, pad_id=tok.pad_id)
    if tok.vocab_size > spec.vocab_size:
        raise UserError(
            f"The tokenizer has {tok.vocab_size} tokens but OpenCLIP config '{arch}' only {spec.vocab_size}; "
            "pass the architecture the checkpoint was trained with."
        )
    state = read_state_dict(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    source = f"'{checkpoint}'" if isinstance(checkpoint, str | Path) else "the state dict"
    model = build_model(
        spec,
        state_from_open_clip({k: v.float() if v.is_floating_point() else v for k, v in state.items()}),
        source,
        f"pass the OpenCLIP architecture it was trained with instead of '{arch}'",
    )
    return model, tok


def to_open_clip(model: DualEncoder) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(model config, preprocess config, state dict) that `open_clip` loads into an equal model."""
    spec = model.spec
    preprocess = {"mean": list(spec.image_mean), "std": list(spec.image_std)}
    state = dict(model.state_dict())
    # OpenCLIP's forward applies exp(logit_scale) unclamped: store the value lipkit actually uses.
    state["logit_scale"] = state["logit_scale"].clamp(max=math.log(model.max_logit_scale))
    bias = float(state["logit_bias"]) if spec.logit_bias else None
    return open_clip_model_config(spec, bias), preprocess, state_to_open_clip(state)


def write_open_clip(
    model: DualEncoder, tokenizer: TextTokenizer, out: str | Path, overwrite: bool = False
) -> Path:
    """Write an OpenCLIP directory: `open_clip_config.json` + `open_clip_model.safetensors` (load it with
    `open_clip.create_model('local-dir:OUT')`), the bare model config `<OUT name>.json` (for
    `open_clip.add_model_config`), and `tokenizer.json` for the return trip."""
    out = Path(out).expanduser()
    refuse_existing(out, overwrite)
    cfg, preprocess, state = to_open_clip(model)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2), encoding="utf-8"
        )
        (tmp / f"{out.name}.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")

    return write_dir(out, write)


def import_open_clip(arch: str, checkpoint: str | Path, out: str | Path) -> Path:
    """`lipkit checkpoint convert --from open_clip ARCH CHECKPOINT OUT`: write a lipkit checkpoint directory."""
    from lipkit.checkpoint import save_checkpoint

    model, tok = from_open_clip(arch, checkpoint)
    info = {"converted_from": {"format": "open_clip", "arch": arch, "checkpoint": str(checkpoint)}}
    return save_checkpoint(Path(out).expanduser(), model, tok, info)


def export_open_clip(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`lipkit checkpoint convert --to open_clip CKPT OUT`: write an OpenCLIP directory from a lipkit checkpoint."""
    from lipkit.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    return write_open_clip(model, tok, out, overwrite)
