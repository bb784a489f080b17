"""Named model sizes. A `ModelSpec` is the whole shape of a dual encoder; presets are just specs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lipkit.errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    embed_dim: int = 256
    # image tower (ViT)
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 6
    vision_heads: int = 3
    # "patch": one strided convolution (ViT); "conv": a stack of 3×3 stride-2 convolutions down to the patch
    # grid (Xiao et al., 2021, "Early Convolutions Help Transformers See Better") — learns faster from little data
    vision_stem: str = "patch"
    # the conv stem's normalisation: "group" (GroupNorm: no batch statistics, so any number of ranks,
    # gradient-caching chunks and a locked tower all compute the same thing); "batch" (BatchNorm2d) only for
    # checkpoints written before this setting existed (a saved config without it loads as "batch")
    stem_norm: str = "group"
    # OpenCLIP CoCa's attentional pooler (models.vision.AttentionalPooler): this many learned queries attend
    # to the ViT's tokens (0: none, pooled at the class token); the first query's output, projected, is the
    # pooled feature and the others are the image tokens (embed_dim wide) a decoder reads
    vision_attn_pool: int = 0
    vision_attn_pool_heads: int = 8
    # "vit": the tower above; "timm": a timm network (models.timm_vision, like OpenCLIP's timm_model_name /
    # timm_pool / timm_proj), usually with pretrained weights (model.image_pretrained)
    vision_tower: str = "vit"
    timm_model_name: str = ""
    timm_pool: str = "avg"
    timm_proj: str = "linear"  # linear | mlp | none
    timm_proj_bias: bool = False
    # text tower (causal transformer, pooled at the end-of-text token)
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 3
    context_length: int = 32
    vocab_size: int = 8192
    eot_id: int = 2  # the text tower pools at the first end-of-text token (set from the tokenizer)
    pad_id: int = 0
    # OpenCLIP CoCa's text tower (models.text): a learned [cls] token after the caption padded to the context,
    # whose final state is the pooled feature; keys are masked as OpenCLIP masks them (see models.text)
    text_embed_cls: bool = False
    # "transformer": the tower above, trained from scratch; "hf": a Hugging Face encoder (e.g. the pretrained
    # all-MiniLM-L6-v2) built from `text_hf_config`, pooled by `text_pool` ("mean" or "cls"), then projected.
    text_tower: str = "transformer"
    text_hf_config: dict[str, Any] | None = None
    text_pool: str = "mean"
    mlp_ratio: float = 4.0
    quick_gelu: bool = False
    logit_bias: bool = False  # a learnable logit bias (SigLIP's sigmoid loss needs one)
    # LexLIP: one lexicon head per tower over this many vocabulary terms (0: none; the lexlip objective
    # turns them on with the tokenizer's vocabulary size)
    lexicon_vocab: int = 0
    # a caption decoder (models.caption_decoder, CoCa's captioning head): this many layers (0: none; the coca
    # objective turns it on), its width (0: the embedding dimension) and heads
    caption_layers: int = 0
    caption_width: int = 0
    caption_heads: int = 4
    # what the decoder reads: "tokens" (the image tower's token grid, CoCa), "embedding" (one normalised
    # embedding: a text-only decoder trained on noised text embeddings that captions image embeddings) or
    # "prefix" (a causal language model reading the image as soft prompts from a connector, models.prefix_decoder)
    # or "text" (OpenCLIP's CoCa layout: the decoder reads the text tower's token states, not its own
    # embeddings, and the image tower's unnormalised tokens; needs text_embed_cls and caption_width = text_width)
    caption_input: str = "tokens"
    caption_queries: int = 8  # the soft prompts a prefix decoder's connector makes of each image
    # an image–text matching head (models.matching_head, UNITER's ITM head re-ranking a shortlist): this many
    # fusion layers (0: none; the itm objective turns it on), its width (0: the embedding dimension) and heads
    match_layers: int = 0
    match_width: int = 0
    match_heads: int = 4
    # how a clip's or slice stack's frame embeddings become one (models.temporal): "" or "mean" (mean pooling),
    # "transformer" (temporal_layers blocks, positions for temporal_frames frames) or "attention" (slice pooling)
    temporal: str = ""
    temporal_layers: int = 1
    temporal_heads: int = 4
    temporal_frames: int = 64
    # frames per clip the model was trained on (data.num_frames; 0: not trained on clips): eval, embed, search
    # and serve decode clips with as many (else data.num_frames, or 8)
    clip_frames: int = 0
    # what `lipkit adapt` added beside the towers (models.adapters): {"method": "coop" | "clip-adapter" |
    # "tip", ...its settings}; None for a model that is not adapted (LoRA merges into the weights: None too)
    adapter: dict[str, Any] | None = None
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec of a saved config (a checkpoint's config.json); settings added since take the value
        that reproduces the model the config was saved from."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"Unknown model setting(s) {sorted(unknown)}; valid ones are {sorted(names)}.")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        clean.setdefault("stem_norm", "batch")  # saved before GroupNorm: a BatchNorm stem and its statistics
        return cls(**clean)


PRESETS: dict[str, ModelSpec] = {
    # The CPU demo: 64 px emoji, 8 px patches (64 tokens + cls).
    "tiny": ModelSpec(),
    # A step up for small GPU runs.
    "small": ModelSpec(
        embed_dim=384,
        image_size=128,
        patch_size=16,
        vision_width=384,
        vision_layers=8,
        vision_heads=6,
        text_width=384,
        text_layers=6,
        text_heads=6,
        context_length=64,
        vocab_size=16384,
    ),
    # A distillation student for the CPU (lipkit distill, docs/distill.md): 128 px like the demo's image
    # tower, a conv-stem ViT of 4 layers and a 3-layer text transformer; with the demo's 30,522-term
    # tokenizer ~6M parameters in all, under a quarter of the demo model's.
    "micro": ModelSpec(
        image_size=128,
        patch_size=16,
        vision_width=160,
        vision_layers=4,
        vision_heads=4,
        vision_stem="conv",
        text_width=128,
        text_layers=3,
        text_heads=2,
    ),
    # The shape of OpenAI CLIP ViT-B/32.
    "base-32": ModelSpec(
        embed_dim=512,
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        text_width=512,
        text_layers=12,
        text_heads=8,
        context_length=77,
        vocab_size=49408,
    ),
}


def get_spec(preset: str, **overrides: Any) -> ModelSpec:
    if preset not in PRESETS:
        raise UserError(f"Unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    base = PRESETS[preset].to_dict()
    unknown = set(overrides) - set(base)
    if unknown:
        raise UserError(f"Unknown model override(s) {sorted(unknown)}; valid ones are {sorted(base)}.")
    return replace(
        PRESETS[preset], **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    )
