"""Hugging Face `CLIPModel` directories in and out (config.json + model.safetensors + tokenizer files);
models with a timm image tower or a Hugging Face text tower go to and from `VisionTextDualEncoderModel`
folders instead (interop.hf_dual).

The mapping, per tower: HF keeps attention's q/k/v as three Linear layers (lipkit and OpenCLIP
concatenate them into `in_proj_weight`/`in_proj_bias`); `layer_norm1/2` are `ln_1/2`, `mlp.fc1/fc2`
are `mlp.c_fc/c_proj`; the vision tower's `pre_layrnorm`/`post_layernorm` are `ln_pre`/`ln_post`,
its patch embedding is `conv1`, position embeddings are an `nn.Embedding`; the projections are
bias-free Linear layers, so their weights are the transpose of lipkit's `proj`/`text_projection`.

HF pools text at the first `eos_token_id`, except for the legacy value 2, where it takes the largest
id (CLIP's end token is the last id). lipkit's own tokenizers have their end token at id 2, so an
export swaps it with the last id (embedding rows and tokenizer alike): the model computes the same
function and both HF rules find the end token.

Only safetensors and tokenizers are needed here; `transformers` is for whoever loads the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.interop import refuse_existing
from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE, EOT, SOT, clip_tokenizer, is_clip_vocab
from lipkit.interop.hf_state import state_from_hf, state_to_hf  # noqa: F401 - re-exported
from lipkit.interop.open_clip import check_exportable
from lipkit.interop.peer_weights import (
    build_model,
    image_processor_config,
    read_hf_weights,
    read_json,
    tokenizer_from_dir,
)
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import OPENAI_MEAN, OPENAI_STD, ModelSpec
from lipkit.text.tokenizer import PAD, TextTokenizer

_ACTS = {"quick_gelu": True, "gelu": False}
# CLIPTextConfig / CLIPVisionConfig defaults, for configs saved without them.
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def _check_clip(config: dict[str, Any], where: str) -> None:
    if config.get("model_type") != "clip":
        raise UserError(
            f"{where} describes a '{config.get('model_type')}' model; lipkit converts Hugging Face CLIPModel "
            "directories (model_type 'clip') only."
        )


def spec_from_hf(
    config: dict[str, Any],
    preprocessor: dict[str, Any] | None,
    eot_id: int,
    where: str = "the config",
    pad_id: int = 0,
) -> ModelSpec:
    """The lipkit ModelSpec of a Hugging Face CLIPConfig dict."""
    _check_clip(config, where)
    t = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    v = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    acts = {t["hidden_act"], v["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_ACTS):
        raise UserError(
            f"{where} uses activations {sorted(acts)}; lipkit supports 'quick_gelu' or 'gelu', the same in both towers."
        )
    for name, c in (("text", t), ("vision", v)):
        if not math.isclose(float(c["layer_norm_eps"]), 1e-5):
            raise UserError(
                f"{where} sets {name} layer_norm_eps={c['layer_norm_eps']}; lipkit's towers use 1e-5."
            )
    if int(v["num_channels"]) != 3:
        raise UserError(
            f"{where} has {v['num_channels']} image channels; lipkit's image tower takes RGB (3)."
        )
    ratio = int(v["intermediate_size"]) / int(v["hidden_size"])
    if int(int(t["hidden_size"]) * ratio) != int(t["intermediate_size"]) or int(
        int(v["hidden_size"]) * ratio
    ) != int(v["intermediate_size"]):
        raise UserError(
            f"{where} uses different MLP ratios in its towers; lipkit's ModelSpec has one for both."
        )
    vocab = int(t["vocab_size"])
    eos = int(t["eos_token_id"])
    if eos == 2:  # HF's legacy rule: pool at the largest id
        if eot_id != vocab - 1:
            raise UserError(
                f"{where} pools text at the largest token id (eos_token_id 2) but the tokenizer's end token is "
                f"{eot_id}; use the tokenizer the model was trained with."
            )
    elif eos != eot_id:
        raise UserError(
            f"{where} pools text at token {eos} but the tokenizer's end token is {eot_id}; "
            "use the tokenizer the model was trained with."
        )
    prep = preprocessor or {}
    return ModelSpec(
        embed_dim=int(config.get("projection_dim", 512)),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        vision_width=int(v["hidden_size"]),
        vision_layers=int(v["num_hidden_layers"]),
        vision_heads=int(v["num_attention_heads"]),
        text_width=int(t["hidden_size"]),
        text_layers=int(t["num_hidden_layers"]),
        text_heads=int(t["num_attention_heads"]),
        context_length=int(t["max_position_embeddings"]),
        vocab_size=vocab,
        eot_id=eot_id,
        pad_id=pad_id,
        mlp_ratio=ratio,
        quick_gelu=_ACTS[t["hidden_act"]],
        image_mean=tuple(float(x) for x in prep.get("image_mean", OPENAI_MEAN)),  # type: ignore[arg-type]
        image_std=tuple(float(x) for x in prep.get("image_std", OPENAI_STD)),  # type: ignore[arg-type]
    )


def hf_config(spec: ModelSpec, tokenizer: TextTokenizer, logit_scale: float) -> dict[str, Any]:
    """A CLIPConfig dict (what `CLIPConfig.to_dict()` writes) for a lipkit spec."""
    act = "quick_gelu" if spec.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": spec.embed_dim,
        "logit_scale_init_value": logit_scale,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.text_width,
            "intermediate_size": int(spec.text_width * spec.mlp_ratio),
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "max_position_embeddings": spec.context_length,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": spec.embed_dim,
            "attention_dropout": 0.0,
            "bos_token_id": tokenizer.sot_id,
            "eos_token_id": spec.eot_id,
            "pad_token_id": tokenizer.pad_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": spec.vision_width,
            "intermediate_size": int(spec.vision_width * spec.mlp_ratio),
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "num_channels": 3,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": spec.embed_dim,
            "attention_dropout": 0.0,
        },
    }


def from_hf(directory: str | Path) -> tuple[DualEncoder, TextTokenizer]:
    """A lipkit model and tokenizer from a Hugging Face CLIPModel directory, or from a
    VisionTextDualEncoderModel one that lipkit wrote (hf_dual)."""
    d = Path(directory).expanduser()
    config = read_json(d / "config.json") if d.is_dir() else None
    if config is None:
        raise UserError(
            f"'{d}' is not a Hugging Face model directory (it needs config.json); pass a directory written "
            "by CLIPModel.save_pretrained."
        )
    if config.get("model_type") == "vision-text-dual-encoder":  # timm image + HF text towers
        from lipkit.interop.hf_dual import from_hf_dual

        return from_hf_dual(d, config)
    _check_clip(config, f"'{d / 'config.json'}'")
    raw = tokenizer_from_dir(d)
    if (
        raw is None
        and int((config.get("text_config") or {}).get("vocab_size", CLIP_VOCAB_SIZE)) != CLIP_VOCAB_SIZE
    ):
        raise UserError(
            f"'{d}' has no tokenizer files and its vocabulary is not CLIP's; save the tokenizer "
            "into it (tokenizer.save_pretrained(dir))."
        )
    preprocessor = read_json(d / "preprocessor_config.json")
    return from_hf_state(config, read_hf_weights(d), raw, preprocessor, where=f"'{d}'")


def from_hf_state(
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    preprocessor: dict[str, Any] | None = None,
    where: str = "the Hugging Face model",
) -> tuple[DualEncoder, TextTokenizer]:
    """A lipkit model from a CLIPConfig dict and CLIPModel state dict (tokenizer: CLIP's BPE by default)."""
    raw = tokenizer if tokenizer is not None else clip_tokenizer()
    ctx = int((config.get("text_config") or {}).get("max_position_embeddings", 77))
    tok = TextTokenizer(raw, ctx)
    spec = spec_from_hf(config, preprocessor, tok.eot_id, where, pad_id=tok.pad_id)
    if tok.vocab_size > spec.vocab_size:
        raise UserError(
            f"The tokenizer of {where} has {tok.vocab_size} tokens but the model only {spec.vocab_size}; "
            "save the model's own tokenizer with it."
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = build_model(
        spec,
        state_from_hf(state, spec, where),
        where,
        "the weights do not match config.json; re-save the model",
    )
    return model, tok


def _swap_ids(tokenizer: Tokenizer, a: int, b: int) -> Tokenizer:
    """The same tokenizer with token ids a and b exchanged (vocab, added tokens, post-processor, padding)."""
    data = json.loads(tokenizer.to_str())

    def swap(i: int) -> int:
        return b if i == a else a if i == b else i

    vocab = data["model"]["vocab"]
    for k, i in vocab.items():
        vocab[k] = swap(i)
    for t in data.get("added_tokens") or []:
        t["id"] = swap(t["id"])
    for s in ((data.get("post_processor") or {}).get("special_tokens") or {}).values():
        s["ids"] = [swap(i) for i in s["ids"]]
    if data.get("padding"):
        data["padding"]["pad_id"] = swap(data["padding"]["pad_id"])
    return Tokenizer.from_str(json.dumps(data))


def to_hf(
    model: DualEncoder, tokenizer: TextTokenizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Tokenizer]:
    """(CLIPConfig dict, CLIPModel state dict, tokenizer) for a lipkit model.

    An end token at id 2 (lipkit's own tokenizers) is moved to the last id first, see the module notes.
    """
    spec, state = model.spec, dict(model.state_dict())
    check_exportable(spec, "Hugging Face's CLIPModel")
    if spec.logit_bias:
        raise UserError(
            "This checkpoint has a learned logit bias (sigmoid loss), which Hugging Face's CLIPModel cannot "
            "hold; convert it with --to open_clip (OpenCLIP keeps the bias) or export it with `lipkit export onnx`."
        )
    raw = tokenizer.tok
    if spec.eot_id == 2:
        last = spec.vocab_size - 1
        emb = state["text.token_embedding.weight"].clone()
        emb[[2, last]] = emb[[last, 2]]
        state["text.token_embedding.weight"] = emb
        raw = _swap_ids(raw, 2, last)
        spec = replace(spec, eot_id=last)
        tokenizer = TextTokenizer(raw, tokenizer.context_length)
    # HF applies exp(logit_scale) unclamped: store the value lipkit actually uses.
    scale = min(float(state["logit_scale"]), math.log(model.max_logit_scale))
    state["logit_scale"] = torch.tensor(scale)
    return hf_config(spec, tokenizer, scale), state_to_hf(state, spec), raw


def _tokenizer_files(tokenizer: TextTokenizer, raw: Tokenizer, spec: ModelSpec, out: Path) -> None:
    data = json.loads(raw.to_str())
    data["padding"], data["truncation"] = None, None  # HF tokenizers pad on request
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    name = tokenizer.tok.id_to_token
    pad, bos, eos = name(tokenizer.pad_id), name(tokenizer.sot_id), name(tokenizer.eot_id)
    common = {"bos_token": bos or SOT, "eos_token": eos or EOT, "model_max_length": spec.context_length}
    if is_clip_vocab(raw.get_vocab()):
        vocab = data["model"]["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        cfg = {"tokenizer_class": "CLIPTokenizer", **common, "unk_token": EOT, "pad_token": EOT}
        cfg["do_lower_case"] = True
    else:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **common, "pad_token": pad if pad else PAD}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def write_hf(model: DualEncoder, tokenizer: TextTokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write a directory that `transformers.CLIPModel/CLIPProcessor.from_pretrained` load; a model with a
    timm image tower or a Hugging Face text tower is written as a VisionTextDualEncoderModel (hf_dual)."""
    if model.spec.vision_tower == "timm" or model.spec.text_tower == "hf":
        from lipkit.interop.hf_dual import write_hf_dual

        return write_hf_dual(model, tokenizer, out, overwrite)
    out = Path(out).expanduser()
    config, state, raw = to_hf(model, tokenizer)
    spec = model.spec
    refuse_existing(out, overwrite)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        pre = image_processor_config(spec)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
        _tokenizer_files(TextTokenizer(raw, tokenizer.context_length), raw, spec, tmp)

    return write_dir(out, write)


def loading_hint(out: Path) -> str:
    """How transformers loads the folder `write_hf` wrote, and what each way gives."""
    config = read_json(out / "config.json") or {}
    if config.get("model_type") == "vision-text-dual-encoder":
        from lipkit.interop.hf_dual import loading_hint as dual_hint

        return dual_hint(out, config)
    return f"transformers.CLIPModel.from_pretrained('{out}')"


def import_hf(directory: str | Path, out: str | Path) -> Path:
    """`lipkit checkpoint convert --from hf DIR OUT`: write a lipkit checkpoint directory."""
    from lipkit.checkpoint import save_checkpoint

    model, tok = from_hf(directory)
    info = {"converted_from": {"format": "hf", "directory": str(directory)}}
    return save_checkpoint(Path(out).expanduser(), model, tok, info)


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`lipkit checkpoint convert --to hf CKPT OUT`: write a Hugging Face CLIPModel directory."""
    from lipkit.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    return write_hf(model, tok, out, overwrite)
