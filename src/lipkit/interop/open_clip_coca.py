"""OpenCLIP's CoCa (`multimodal_cfg`, e.g. coca_ViT-B-32) in and out of lipkit.

OpenCLIP's CoCa is three towers: a ViT with an attentional pooler (`vision_cfg.attentional_pool: true`:
the first of its queries is the pooled feature, the others the image tokens), a causal text tower with a
[cls] token (`text_cfg.embed_cls: true`, pooled at the [cls] token) and a multimodal decoder
(`text_decoder`: causal self-attention over the text tower's token states before its final norm,
cross-attention to the image tokens, then a vocabulary projection). lipkit holds it as a DualEncoder with
`vision_attn_pool`, `text_embed_cls` and a caption decoder with `caption_input: text` (models.vision,
models.text, models.caption_decoder), so converting is a rename: `text_decoder.*` ↔ `captioner.*`, with the
vocabulary projection a (width, vocab) matrix in OpenCLIP and a bias-free Linear (its transpose) in lipkit.
The text tower stays under `text.` in both (CoCa is a custom-text model).

Refused with the setting's name: CoCa without the attentional pooler or the [cls] token (OpenCLIP's decoder
then reads other features), the pooler's 'parallel'/'cascade' variants, layer scale in the decoder, and
widths that differ (the decoder reads the text states and the image tokens without a projection).
`multimodal_cfg.mlp_ratio`, `dim_head` and `n_queries` are ignored, as OpenCLIP's decoder ignores them
(its MLPs are 4× wide); its `context_length` only sizes OpenCLIP's causal-mask buffer, and export writes the
text tower's.
"""

from __future__ import annotations

from typing import Any

import torch

from lipkit.errors import UserError
from lipkit.models.presets import ModelSpec

PREFIX_IN, PREFIX_OUT = "text_decoder.", "captioner."
PROJECTION = "text_projection"


def is_coca(cfg: dict[str, Any]) -> bool:
    """Whether an OpenCLIP model config is a CoCa (OpenCLIP builds one when `multimodal_cfg` is there)."""
    return cfg.get("multimodal_cfg") is not None


def coca_fields(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    """The ModelSpec fields of a CoCa config's decoder, after checking the towers it reads."""
    vision, text, mm = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}, dict(cfg["multimodal_cfg"])
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise UserError(
            f"OpenCLIP CoCa config '{arch}' has a timm image tower or a Hugging Face text tower; lipkit converts "
            "CoCa models with OpenCLIP's own ViT and text transformer (as coca_ViT-B-32)."
        )
    for part, key in (("vision_cfg", "attentional_pool"), ("text_cfg", "embed_cls")):
        if (vision if part == "vision_cfg" else text).get(key) is not True:
            raise UserError(
                f"OpenCLIP CoCa config '{arch}' needs {part}.{key}=true (as coca_ViT-B-32 has); lipkit's CoCa "
                "decoder reads the features that setting gives."
            )
    if mm.get("ls_init_value") is not None:
        raise UserError(
            f"OpenCLIP CoCa config '{arch}' sets multimodal_cfg.ls_init_value (layer scale), which lipkit's "
            "decoder does not implement; convert a config without it."
        )
    width, text_width = int(mm.get("width", 512)), int(text.get("width", 512))
    if not width == text_width == int(cfg["embed_dim"]):
        raise UserError(
            f"OpenCLIP CoCa config '{arch}' has a decoder {width} wide, a text tower {text_width} wide and "
            f"embed_dim {cfg['embed_dim']}; lipkit converts CoCa models whose three are equal."
        )
    return {
        "caption_layers": int(mm.get("layers", 12)),
        "caption_width": width,
        "caption_heads": int(mm.get("heads", 8)),
        "caption_input": "text",
    }


def coca_config(spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` (the towers' OpenCLIP config) with CoCa's settings where the model has them: the attentional
    pooler, the [cls] text token (a custom-text model in OpenCLIP) and a text-reading decoder (a CoCa)."""
    out = dict(cfg)
    if spec.vision_tower == "vit" and spec.vision_attn_pool:
        out["vision_cfg"] = {
            **cfg["vision_cfg"],
            "attentional_pool": True,
            "attn_pooler_queries": spec.vision_attn_pool,
            "attn_pooler_heads": spec.vision_attn_pool_heads,
        }
    if spec.text_embed_cls:
        out["custom_text"] = True
        out["text_cfg"] = {**cfg["text_cfg"], "embed_cls": True, "pad_id": spec.pad_id}
    if not spec.caption_layers:
        return out
    if spec.vision_tower != "vit" or not spec.vision_attn_pool or not spec.text_embed_cls:
        raise UserError(
            "This checkpoint's caption decoder reads the text tower's states but its towers lack OpenCLIP "
            "CoCa's attentional pooler or [cls] token (model vision_attn_pool, text_embed_cls), which "
            "OpenCLIP's CoCa reads; export it with `lipkit export onnx` instead."
        )
    out["vision_cfg"]["output_tokens"] = out["text_cfg"]["output_tokens"] = True  # CoCa reads both
    out["multimodal_cfg"] = {
        "context_length": spec.context_length,
        "vocab_size": spec.vocab_size,
        "width": spec.caption_width or spec.embed_dim,
        "heads": spec.caption_heads,
        "layers": spec.caption_layers,
    }
    return out


def decoder_state_in(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One OpenCLIP `text_decoder.*` entry as lipkit's `captioner.*` (the projection transposed)."""
    name = PREFIX_OUT + key.removeprefix(PREFIX_IN)
    if key == PREFIX_IN + PROJECTION:
        return name + ".weight", value.t().contiguous()
    return name, value


def decoder_state_out(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with lipkit's `captioner.*` entries under OpenCLIP CoCa's `text_decoder.*` names (the
    projection transposed); the rest as it is."""
    out = {}
    for k, v in state.items():
        if k == PREFIX_OUT + PROJECTION + ".weight":
            out[PREFIX_IN + PROJECTION] = v.t().contiguous()
        elif k.startswith(PREFIX_OUT):
            out[PREFIX_IN + k.removeprefix(PREFIX_OUT)] = v
        else:
            out[k] = v
    return out
