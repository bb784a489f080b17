"""An OpenCLIP model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`) read as a lipkit
ModelSpec. Settings lipkit's towers do not implement (layer scale, attentional pooling, timm or Hugging
Face towers, ...) are refused with the setting's name rather than converted wrongly."""

from __future__ import annotations

from typing import Any

from lipkit.errors import UserError
from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE
from lipkit.models.presets import OPENAI_MEAN, OPENAI_STD, ModelSpec

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


def _square_size(size: int | list | tuple, arch: str) -> int:
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise UserError(
                f"OpenCLIP config '{arch}' has non-square images {size}; lipkit needs square ones."
            )
        size = size[0]
    return int(size)


def _check_text_pooling(text: dict[str, Any], vocab_size: int, eot_id: int, arch: str) -> None:
    """The text tower pools at the end token: the tokenizer's end token must be the one pooled at."""
    pool = text.get("pool_type", "argmax")
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
    size = _square_size(vision.get("image_size", 224), arch)
    v_ratio, t_ratio = float(vision.get("mlp_ratio", 4.0)), float(text.get("mlp_ratio", 4.0))
    if v_ratio != t_ratio:
        raise UserError(
            f"OpenCLIP config '{arch}' uses different MLP ratios ({v_ratio} vs {t_ratio}) in its towers; "
            "lipkit's ModelSpec has one mlp_ratio for both."
        )
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    vocab_size = int(text.get("vocab_size", CLIP_VOCAB_SIZE))
    eot_id = vocab_size - 1 if eot_id is None else eot_id
    _check_text_pooling(text, vocab_size, eot_id, arch)
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
