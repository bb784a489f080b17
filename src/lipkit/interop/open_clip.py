"""OpenCLIP checkpoints in and out.

lipkit's parameter names follow OpenCLIP, so the state dict is a rename: OpenCLIP keeps the text
tower at the top level (`token_embedding`, `transformer.resblocks...`, `ln_final`,
`text_projection`) where lipkit nests it under `text.`. The architecture comes from an OpenCLIP
model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`); settings lipkit's towers
do not implement (layer scale, attentional pooling, timm or Hugging Face towers, ...) are refused
with the setting's name rather than converted wrongly.

Reading and writing need only safetensors (and torch for .pt files); `open_clip` itself is used to
look architectures up by name and, in tests, to check parity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lipkit.errors import UserError
from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE, clip_tokenizer
from lipkit.interop.output_dir import fresh_dir, publish
from lipkit.interop.peer_weights import build_model, read_state_dict, require, tokenizer_from_dir
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import OPENAI_MEAN, OPENAI_STD, ModelSpec
from lipkit.text.tokenizer import TextTokenizer

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
_ANY = object()  # a setting that does not change inference
# OpenCLIP settings lipkit's towers reproduce only at these values (OpenCLIP's defaults); first the
# transformer-block options both towers share.
_BLOCK_INERT: dict[str, Any] = {
    "output_tokens": _ANY,
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": (None, "default"),
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_VISION_INERT: dict[str, Any] = {
    "ls_init_value": None,
    "patch_dropout": _ANY,
    "attentional_pool": False,
    "attn_pooler_queries": _ANY,
    "attn_pooler_heads": _ANY,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    **_BLOCK_INERT,
    "timm_model_name": None,
    "timm_model_pretrained": _ANY,
    "timm_pool": _ANY,
    "timm_proj": _ANY,
    "timm_proj_bias": _ANY,
    "timm_drop": _ANY,
    "timm_drop_path": _ANY,
    "image_mean": _ANY,
    "image_std": _ANY,
}
_TEXT_INERT: dict[str, Any] = {
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
    "ls_init_value": None,
    "embed_cls": False,
    "pad_id": _ANY,
    "eos_id": _ANY,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": ("argmax", "eos"),
    "proj_bias": False,
    "proj_type": "linear",
    **_BLOCK_INERT,
    "hf_model_name": None,
    "hf_model_pretrained": _ANY,
    "hf_proj_type": _ANY,
    "hf_pooler_type": _ANY,
}
_TOP_INERT: dict[str, Any] = {
    "custom_text": _ANY,
    "init_logit_scale": _ANY,
    "nonscalar_logit_scale": _ANY,
    "cast_dtype": _ANY,
    "output_dict": _ANY,
    "multimodal_cfg": None,
}


def _check_inert(cfg: dict[str, Any], known: set[str], inert: dict[str, Any], where: str, arch: str) -> None:
    for key, value in cfg.items():
        if key in known:
            continue
        if key not in inert:
            raise UserError(
                f"OpenCLIP config '{arch}' has the setting {where}{key}, which lipkit does not know; "
                "convert a plain ViT CLIP config (e.g. ViT-B-32) or remove the setting."
            )
        ok = inert[key]
        if ok is _ANY or value == ok or (isinstance(ok, tuple) and value in ok):
            continue
        raise UserError(
            f"OpenCLIP config '{arch}' sets {where}{key}={value!r}, which lipkit's towers do not implement; "
            "convert a plain ViT CLIP config (e.g. ViT-B-32) instead."
        )


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


def spec_from_open_clip(
    cfg: dict[str, Any],
    preprocess: dict[str, Any] | None = None,
    eot_id: int | None = None,
    arch: str = "?",
    pad_id: int | None = None,
) -> ModelSpec:
    """The lipkit ModelSpec of an OpenCLIP model config (plain ViT image tower, CLIP text tower)."""
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    top = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_bias"}
    _check_inert(cfg, top, _TOP_INERT, "", arch)
    vk = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
    tk = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
    _check_inert(vision, vk, _VISION_INERT, "vision_cfg.", arch)
    _check_inert(text, tk, _TEXT_INERT, "text_cfg.", arch)
    if isinstance(vision.get("layers", 12), list | tuple):
        raise UserError(
            f"OpenCLIP config '{arch}' has a ResNet image tower; lipkit converts ViT towers only."
        )
    size = vision.get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise UserError(
                f"OpenCLIP config '{arch}' has non-square images {size}; lipkit needs square ones."
            )
        size = size[0]
    v_ratio, t_ratio = float(vision.get("mlp_ratio", 4.0)), float(text.get("mlp_ratio", 4.0))
    if v_ratio != t_ratio:
        raise UserError(
            f"OpenCLIP config '{arch}' uses different MLP ratios ({v_ratio} vs {t_ratio}) in its towers; "
            "lipkit's ModelSpec has one mlp_ratio for both."
        )
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    vocab_size = int(text.get("vocab_size", CLIP_VOCAB_SIZE))
    pool = text.get("pool_type", "argmax")
    if eot_id is None:
        eot_id = vocab_size - 1
    if pool == "argmax" and eot_id != vocab_size - 1:
        raise UserError(
            f"OpenCLIP config '{arch}' pools text at the largest token id but the tokenizer's end token is "
            f"{eot_id}; use CLIP's BPE tokenizer (end token {vocab_size - 1})."
        )
    if pool == "eos" and int(text.get("eos_id", 2)) != eot_id:
        raise UserError(
            f"OpenCLIP config '{arch}' pools text at token {text.get('eos_id', 2)} but the tokenizer's end "
            f"token is {eot_id}; pass the tokenizer the model was trained with."
        )
    prep = dict(preprocess or {})
    mean = prep.get("mean") or vision.get("image_mean") or OPENAI_MEAN
    std = prep.get("std") or vision.get("image_std") or OPENAI_STD
    return ModelSpec(
        embed_dim=int(cfg["embed_dim"]),
        image_size=int(size),
        patch_size=int(vision.get("patch_size", 16)),
        vision_width=width,
        vision_layers=int(vision.get("layers", 12)),
        vision_heads=width // head_width,
        text_width=int(text.get("width", 512)),
        text_layers=int(text.get("layers", 12)),
        text_heads=int(text.get("heads", 8)),
        context_length=int(text.get("context_length", 77)),
        vocab_size=vocab_size,
        eot_id=eot_id,
        pad_id=int(text.get("pad_id", 0)) if pad_id is None else pad_id,
        mlp_ratio=v_ratio,
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        logit_bias=cfg.get("init_logit_bias") is not None,  # SigLIP-style models keep a learned bias
        image_mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
        image_std=tuple(float(x) for x in std),  # type: ignore[arg-type]
    )


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
    tmp = fresh_dir(out, overwrite)
    try:
        cfg, preprocess, state = to_open_clip(model)
        (tmp / CONFIG_NAME).write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2), encoding="utf-8"
        )
        (tmp / f"{out.name}.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        return publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
