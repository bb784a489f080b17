"""lipkit's timm image tower and Hugging Face text tower as OpenCLIP's `TimmModel` and `HFTextEncoder`.

Export side: the `vision_cfg` / `text_cfg` entries of an OpenCLIP config, the text model folder written
beside the export, and the renames of the text weights. OpenCLIP builds a `CustomTextCLIP` whenever the
text tower is a Hugging Face model, and keeps its weights as `text.transformer.*` (the encoder, lipkit's
`text.encoder.*`) and `text.proj.weight` (a bias-free Linear: lipkit's `text.text_projection`
transposed); the timm tower's names (`visual.trunk.*`, `visual.head.proj.weight`, `visual.head.mlp.*`)
are lipkit's already.

Pooling: lipkit's "mean" (over tokens that are not padding) is OpenCLIP's `mean_pooler`; lipkit's "cls"
(the first token's last hidden state) is OpenCLIP's `cls_last_hidden_state_pooler`, not `cls_pooler`,
which runs BERT's extra pooler layer (dense + tanh) that lipkit's tower does not have. OpenCLIP masks
padding with the text model config's `pad_token_id`, so the exported config.json carries the
tokenizer's pad id.

`hf_model_name` / `hf_tokenizer_name` name the folder `<OUT>/text_model` (config.json, tokenizer.json,
tokenizer_config.json) by its ABSOLUTE path: OpenCLIP hands the name to transformers'
`AutoConfig.from_pretrained`, which resolves a relative path against the working directory of the
process, not against the config's folder (`local-dir:` relocates only the tokenizer, to OUT itself). A
moved export still imports into lipkit (`from_open_clip` also looks for the folder's name beside the
config); for OpenCLIP, edit the two names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lipkit.errors import UserError
from lipkit.interop.peer_weights import require
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer

TEXT_DIR = "text_model"
# the encoder-only model types of OpenCLIP's hf_configs.arch_dict (mt5 and m2m_100 are encoder-decoders)
HF_TYPES = ("bert", "roberta", "xlm-roberta")
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TIMM_POOLS = ("avg", "max", "avgmax")
_IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # older transformers saved them


def timm_vision_cfg(spec: ModelSpec) -> dict[str, Any]:
    """OpenCLIP's `vision_cfg` for lipkit's timm tower (untrained: the weights come with the export)."""
    if spec.timm_pool not in TIMM_POOLS:
        raise UserError(
            f"This checkpoint's timm tower has timm_pool='{spec.timm_pool}', but only "
            f"{', '.join(TIMM_POOLS)} convert; export it with `lipkit export onnx` instead."
        )
    return {
        "timm_model_name": spec.timm_model_name,
        "timm_model_pretrained": False,
        "timm_pool": spec.timm_pool,
        "timm_proj": spec.timm_proj,
        "timm_proj_bias": spec.timm_proj_bias,
        "image_size": spec.image_size,
    }


def check_timm_trunk(tower: Any) -> None:
    """Refuse a timm tower OpenCLIP's TimmModel would build otherwise: it gives timm no input size (the
    trunk is built for its own) and sizes the projection by the trunk's `num_features`."""
    if tower.built_size is not None:
        raise UserError(
            f"OpenCLIP's TimmModel builds timm '{tower.name}' for its own input size, not this checkpoint's "
            f"{tower.built_size} px (it passes timm no img_size); export it with `lipkit export onnx` instead."
        )
    if tower.width != tower.trunk.num_features:
        raise UserError(
            f"OpenCLIP's TimmModel projects the {tower.trunk.num_features} channels of timm "
            f"'{tower.name}', not the {tower.width} pooled features it outputs; export it with "
            "`lipkit export onnx` instead."
        )


def hf_text_cfg(spec: ModelSpec, folder: str) -> dict[str, Any]:
    """OpenCLIP's `text_cfg` for lipkit's Hugging Face tower, whose config and tokenizer are in `folder`."""
    model_type = (spec.text_hf_config or {}).get("model_type")
    if model_type not in HF_TYPES:
        raise UserError(
            f"OpenCLIP's Hugging Face text tower knows the model types {', '.join(HF_TYPES)}, not "
            f"'{model_type}'; export this checkpoint with `lipkit export onnx` instead."
        )
    if spec.text_pool not in POOLERS:
        raise UserError(
            f"This checkpoint's text tower pools with '{spec.text_pool}', which OpenCLIP has no pooler for "
            f"({', '.join(POOLERS)} convert); export it with `lipkit export onnx` instead."
        )
    return {
        "hf_model_name": folder,
        "hf_tokenizer_name": folder,
        "hf_model_pretrained": False,
        "hf_proj_type": "linear",
        "hf_pooler_type": POOLERS[spec.text_pool],
        "context_length": spec.context_length,
    }


def export_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The text model's config.json: lipkit's `text_hf_config`, with the pad id lipkit masks (OpenCLIP
    masks the config's `pad_token_id`)."""
    config = dict(spec.text_hf_config or {})
    if hf_pad_token_id(config) != spec.pad_id:
        config["pad_token_id"] = spec.pad_id
    return config


def write_tokenizer_files(folder: Path, tokenizer: TextTokenizer) -> None:
    """tokenizer.json and the tokenizer_config.json that lets transformers' AutoTokenizer (OpenCLIP's
    HFTokenizer) load it as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": tokenizer.tok.padding["pad_token"],
        "model_max_length": tokenizer.context_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def write_text_model(folder: Path, spec: ModelSpec, tokenizer: TextTokenizer) -> None:
    """The folder `hf_model_name` names: config.json (no weights: they are in the OpenCLIP state dict)
    and the tokenizer."""
    write_tokenizer_files(folder, tokenizer)
    (folder / "config.json").write_text(json.dumps(export_hf_config(spec), indent=2), encoding="utf-8")


def hf_state_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lipkit state dict with a Hugging Face text tower under `CustomTextCLIP` names."""
    out = {}
    for k, v in state.items():
        if k == "text.text_projection":
            k, v = "text.proj.weight", v.T
        elif k.startswith("text.encoder."):
            k = "text.transformer." + k.removeprefix("text.encoder.")
        out[k] = v.detach().cpu().clone().contiguous()
    return out


def hf_state_from_open_clip(state: dict[str, torch.Tensor], identity: int | None) -> dict[str, torch.Tensor]:
    """A `CustomTextCLIP` state dict (Hugging Face text tower) under lipkit's names; `identity`: the width
    of an identity projection (OpenCLIP's `hf_proj_type: null` with width = embed_dim), else None."""
    out = {}
    for k, v in state.items():
        if k == "text.proj.weight":
            k, v = "text.text_projection", v.T
        elif k.startswith("text.transformer."):
            k = "text.encoder." + k.removeprefix("text.transformer.")
            if k.endswith(_IGNORED_BUFFERS):
                continue
        out[k] = v
    if identity is not None:
        out["text.text_projection"] = torch.eye(identity)
    return out


def find_hf_folder(name: str, arch: str, bases: list[Path], setting: str = "hf_model_name") -> Path:
    """The local folder (with config.json) that an OpenCLIP config's `text_cfg.<setting>` names: the path
    itself, else that path or its last part inside one of `bases` (the config's or checkpoint's folder,
    where `write_open_clip` puts it)."""
    path = Path(name).expanduser()
    places = [path]
    for base in bases:
        places += [base / path, base / path.name] if not path.is_absolute() else [base / path.name]
    for place in places:
        if (place / "config.json").is_file():
            return place
    raise UserError(
        f"OpenCLIP config '{arch}' names the Hugging Face text model '{name}' (text_cfg.{setting}), which "
        "is not a local folder with config.json; download the model into a folder (e.g. `hf download "
        f"{name} --local-dir DIR`) and set text_cfg.{setting} to that folder."
    )


def read_hf_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"'{folder / 'config.json'}' is not valid JSON ({e}); re-save the text model.") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(
            f"'{folder / 'config.json'}' is not a Hugging Face model config (it has no model_type); "
            "re-save the text model with save_pretrained."
        )
    return config


def hf_pad_token_id(config: dict[str, Any]) -> int | None:
    """The pad id OpenCLIP's HFTextEncoder masks: the config's, or the model type's default."""
    if "pad_token_id" in config:
        return config["pad_token_id"]
    transformers = require("transformers", "Reading a Hugging Face text model config")
    return transformers.AutoConfig.for_model(**config).pad_token_id
