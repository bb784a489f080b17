"""An OpenCLIP model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`) read as a lipkit
ModelSpec: a ViT or timm image tower (`timm_model_name`, avg/max/avgmax pooling, linear/mlp/no
projection) and CLIP's text tower or a Hugging Face encoder (`hf_model_name`; mean or first-token
pooling, linear projection — `hf_fields`, from the text model's own config). Settings lipkit's towers do
not implement (layer scale, ResNets, attention-pooled timm towers, BERT's `cls_pooler`, MLP text
projections, encoder-decoder text models, ...) are refused with the setting's name rather than converted
wrongly. OpenCLIP CoCa's attentional pooler, [cls] text token and decoder are read too (open_clip_coca.py)."""

from __future__ import annotations

from typing import Any

from lipkit.errors import UserError
from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE
from lipkit.interop.open_clip_coca import coca_fields, is_coca
from lipkit.interop.open_clip_custom import hf_pad_token_id
from lipkit.interop.peer_weights import require
from lipkit.models.presets import OPENAI_MEAN, OPENAI_STD, ModelSpec
from lipkit.text.tokenizer import TextTokenizer

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


_VIT_KEYS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_VIT_KEYS |= {"attentional_pool", "attn_pooler_queries", "attn_pooler_heads"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "embed_cls"}
_TIMM_KEYS = {"timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "image_size"}
_HF_KEYS = {"hf_model_name", "hf_tokenizer_name", "hf_proj_type", "hf_pooler_type", "context_length"}
# settings OpenCLIP ignores when the tower is a timm / Hugging Face model (and the tokenizer ones that
# would change the token ids, which must stay at their defaults)
_TIMM_INERT = {k: _ANY for k in {*_VISION_INERT, *_VIT_KEYS} - _TIMM_KEYS}
_HF_INERT = {
    **{k: _ANY for k in {*_TEXT_INERT, *_TEXT_KEYS} - _HF_KEYS},
    "tokenizer_mode": None,
    "tokenizer_kwargs": None,
}
# OpenCLIP's default pooler per model type (hf_configs.arch_dict) for `hf_pooler_type: null`
_HF_DEFAULT_POOLER = {"bert": "cls_pooler", "roberta": "mean_pooler", "xlm-roberta": "mean_pooler"}


def _vit_fields(vision: dict[str, Any], arch: str) -> dict[str, Any]:
    _check_inert(vision, _VIT_KEYS, _VISION_INERT, "vision_cfg.", arch)
    if isinstance(vision.get("layers", 12), list | tuple):
        raise UserError(
            f"OpenCLIP config '{arch}' has a ResNet image tower; lipkit converts ViT and timm towers only."
        )
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    pool = vision.get("attentional_pool", False)
    if pool not in (False, True):
        raise UserError(
            f"OpenCLIP config '{arch}' sets vision_cfg.attentional_pool={pool!r}, a pooler variant lipkit's ViT "
            "does not implement; lipkit converts attentional_pool true (OpenCLIP's CoCa) or false."
        )
    pooler = {}
    if pool:  # OpenCLIP's CoCa pooler: the first query pooled, the others the image tokens
        queries, heads = int(vision.get("attn_pooler_queries", 256)), int(vision.get("attn_pooler_heads", 8))
        pooler = {"vision_attn_pool": queries, "vision_attn_pool_heads": heads}
    return {
        **pooler,
        "image_size": _square_size(vision.get("image_size", 224), arch),
        "patch_size": int(vision.get("patch_size", 16)),
        "vision_width": width,
        "vision_layers": int(vision.get("layers", 12)),
        "vision_heads": width // head_width,
        "mlp_ratio": float(vision.get("mlp_ratio", 4.0)),
    }


def _timm_fields(vision: dict[str, Any], arch: str) -> dict[str, Any]:
    """A timm image tower (OpenCLIP's TimmModel): linear, MLP or no projection after avg/max pooling."""
    _check_inert(vision, _TIMM_KEYS, _TIMM_INERT, "vision_cfg.", arch)
    name, pool = str(vision["timm_model_name"]), vision.get("timm_pool", "avg")
    proj = vision.get("timm_proj", "linear")
    if proj not in ("linear", "mlp", "none"):
        raise UserError(
            f"OpenCLIP config '{arch}' sets vision_cfg.timm_proj={proj!r} (the timm network's classifier as "
            "the projection), which lipkit's timm tower does not implement; use 'linear', 'mlp' or 'none'."
        )
    if pool == "" and proj != "none":
        raise UserError(
            f"OpenCLIP config '{arch}' sets vision_cfg.timm_pool='' (the timm network's own pooling), which "
            "lipkit needs spelled out; set it to that pooling ('avg' for most CNNs)."
        )
    if pool not in ("avg", "max", "avgmax"):
        raise UserError(
            f"OpenCLIP config '{arch}' sets vision_cfg.timm_pool={pool!r}, which lipkit's timm tower does not "
            "implement; lipkit pools with 'avg', 'max' or 'avgmax'."
        )
    timm = require("timm", "Converting an OpenCLIP timm image tower")
    if not timm.is_model(name):
        raise UserError(
            f"OpenCLIP config '{arch}' names the timm model '{name}', which timm {timm.__version__} does not "
            "have; fix vision_cfg.timm_model_name or upgrade timm (`pip install -U timm`)."
        )
    return {
        "vision_tower": "timm",
        "timm_model_name": name,
        "timm_pool": pool,
        "timm_proj": proj,
        "timm_proj_bias": bool(vision.get("timm_proj_bias", False)),
        "image_size": _square_size(vision.get("image_size", 224), arch),
    }


def _text_fields(text: dict[str, Any], eot_id: int | None, pad_id: int | None, arch: str) -> dict[str, Any]:
    """lipkit's causal transformer text tower (OpenCLIP's TextTransformer)."""
    inert = (
        {**_TEXT_INERT, "pool_type": _ANY} if text.get("embed_cls") else _TEXT_INERT
    )  # [cls]: pooled there
    _check_inert(text, _TEXT_KEYS, inert, "text_cfg.", arch)
    vocab_size = int(text.get("vocab_size", CLIP_VOCAB_SIZE))
    eot_id = vocab_size - 1 if eot_id is None else eot_id
    cls = bool(text.get("embed_cls", False))
    if not cls:  # a [cls] tower pools at the [cls] token, whatever pool_type says
        _check_text_pooling(text, vocab_size, eot_id, arch)
    elif pad_id is not None and int(text.get("pad_id", 0)) != pad_id:
        raise UserError(
            f"OpenCLIP config '{arch}' masks text_cfg.pad_id={text.get('pad_id', 0)} but the tokenizer pads with "
            f"{pad_id}; pass the tokenizer the model was trained with."
        )
    return {
        "text_embed_cls": cls,
        "text_width": int(text.get("width", 512)),
        "text_layers": int(text.get("layers", 12)),
        "text_heads": int(text.get("heads", 8)),
        "context_length": int(text.get("context_length", 77)),
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "pad_id": int(text.get("pad_id", 0)) if pad_id is None else pad_id,
    }


def hf_fields(
    text: dict[str, Any], hf_config: dict[str, Any], embed_dim: int, arch: str, tokenizer: TextTokenizer
) -> dict[str, Any]:
    """A Hugging Face text tower (OpenCLIP's HFTextEncoder) with the model config `hf_config` and the
    `tokenizer` from its folder: mean or first-token pooling, a linear projection."""
    _check_inert(text, _HF_KEYS, _HF_INERT, "text_cfg.", arch)
    model_type = hf_config.get("model_type")
    if hf_config.get("is_encoder_decoder") or model_type not in _HF_DEFAULT_POOLER:
        raise UserError(
            f"OpenCLIP config '{arch}' has a '{model_type}' text model; lipkit's Hugging Face text tower "
            f"converts the encoder types {', '.join(_HF_DEFAULT_POOLER)}."
        )
    pooler = text.get("hf_pooler_type", "mean_pooler") or _HF_DEFAULT_POOLER[model_type]
    pools = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "cls"}
    if pooler not in pools:
        raise UserError(
            f"OpenCLIP config '{arch}' pools text with hf_pooler_type={pooler!r}, which lipkit's text tower "
            "does not implement (cls_pooler adds BERT's dense+tanh pooler layer); lipkit converts "
            "mean_pooler and cls_last_hidden_state_pooler."
        )
    proj, width = text.get("hf_proj_type", "mlp"), hf_config.get("hidden_size")
    if proj != "linear" and not (proj is None and width == embed_dim):
        raise UserError(
            f"OpenCLIP config '{arch}' projects text with hf_proj_type={proj!r}, which lipkit's text tower "
            "does not implement; lipkit converts the 'linear' projection."
        )
    if tokenizer.vocab_size > int(hf_config.get("vocab_size", tokenizer.vocab_size)):
        raise UserError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the text model of OpenCLIP config '{arch}' "
            f"only {hf_config['vocab_size']}; put the model's own tokenizer.json in its folder."
        )
    pad = hf_pad_token_id(hf_config)
    if pad != tokenizer.pad_id:
        raise UserError(
            f"The text model of OpenCLIP config '{arch}' masks pad_token_id {pad} but its tokenizer pads with "
            f"id {tokenizer.pad_id}; set pad_token_id to {tokenizer.pad_id} in the model's config.json."
        )
    return {
        "text_tower": "hf",
        "text_hf_config": hf_config,
        "text_pool": pools[pooler],
        "context_length": int(text.get("context_length", 77)),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
    }


def spec_from_open_clip(
    cfg: dict[str, Any],
    preprocess: dict[str, Any] | None = None,
    eot_id: int | None = None,
    arch: str = "?",
    pad_id: int | None = None,
    text_fields: dict[str, Any] | None = None,
) -> ModelSpec:
    """The lipkit ModelSpec of an OpenCLIP model config: a ViT or timm image tower, and CLIP's text
    tower — or, given `text_fields` (`hf_fields` of the Hugging Face text tower), that one."""
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    top = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_bias", "multimodal_cfg"}
    _check_inert(cfg, top, _TOP_INERT, "", arch)
    timm = bool(vision.get("timm_model_name"))
    fields = _timm_fields(vision, arch) if timm else _vit_fields(vision, arch)
    if text.get("hf_model_name"):
        if text_fields is None:
            raise UserError(
                f"OpenCLIP config '{arch}' has a Hugging Face text tower; convert it with from_open_clip, "
                "which reads the text model's folder."
            )
        fields.update(text_fields)
    else:
        fields.update(_text_fields(text, eot_id, pad_id, arch))
        t_ratio = float(text.get("mlp_ratio", 4.0))
        if timm:
            fields["mlp_ratio"] = t_ratio
        elif fields["mlp_ratio"] != t_ratio:
            raise UserError(
                f"OpenCLIP config '{arch}' uses different MLP ratios ({fields['mlp_ratio']} vs {t_ratio}) in "
                "its towers; lipkit's ModelSpec has one mlp_ratio for both."
            )
    decoder = coca_fields(cfg, arch) if is_coca(cfg) else {}  # after the towers' own refusals
    prep = dict(preprocess or {})
    mean = prep.get("mean") or vision.get("image_mean") or OPENAI_MEAN
    std = prep.get("std") or vision.get("image_std") or OPENAI_STD
    return ModelSpec(
        embed_dim=int(cfg["embed_dim"]),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        logit_bias=cfg.get("init_logit_bias") is not None,  # SigLIP-style models keep a learned bias
        image_mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
        image_std=tuple(float(x) for x in std),  # type: ignore[arg-type]
        **fields,
        **decoder,
    )
