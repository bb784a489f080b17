"""Two towers, projections into one embedding space, and CLIP's learnable logit scale."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.data.transforms import normalize as normalize_pixels
from lipkit.errors import UserError
from lipkit.models.adapters import adapter_of
from lipkit.models.caption_decoder import CaptionDecoder, TextReading
from lipkit.models.frame_prompts import FramePrompts
from lipkit.models.hf_text import HFTextTower
from lipkit.models.image_adapter import ImageAdapter
from lipkit.models.lexicon_head import LexiconHead
from lipkit.models.locking import lock_tower
from lipkit.models.matching_head import MatchingHead
from lipkit.models.prefix_decoder import PrefixDecoder
from lipkit.models.presets import ModelSpec
from lipkit.models.pseudo_word import PseudoWord
from lipkit.models.regions import as_rois, region_pool, require_patch_grid
from lipkit.models.temporal import temporal_head_of
from lipkit.models.text import TextTransformer
from lipkit.models.timm_vision import TimmTower
from lipkit.models.vision import VisionTransformer


class DualEncoder(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: float = -10.0,
    ):
        super().__init__()
        if spec.vision_tower not in ("vit", "timm"):
            raise UserError(
                f"model vision_tower must be 'vit' (lipkit's ViT) or 'timm' (the timm network named by "
                f"timm_model_name), not '{spec.vision_tower}'."
            )
        if (spec.vision_attn_pool and spec.vision_tower != "vit") or (
            spec.text_embed_cls and spec.text_tower != "transformer"
        ):
            raise UserError(
                "model vision_attn_pool and text_embed_cls (OpenCLIP CoCa's towers) apply to lipkit's own ViT and "
                "text transformer; unset them for a timm image tower or a Hugging Face text tower."
            )
        self.spec = spec
        self.max_logit_scale = max_logit_scale
        self.visual = TimmTower(spec) if spec.vision_tower == "timm" else VisionTransformer(spec)
        self.text = HFTextTower(spec) if spec.text_tower == "hf" else TextTransformer(spec)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if spec.logit_bias else None
        if spec.lexicon_vocab:  # LexLIP heads on the projected token features of each tower
            self.image_lexicon = LexiconHead(spec.embed_dim, spec.lexicon_vocab)
            self.text_lexicon = LexiconHead(spec.embed_dim, spec.lexicon_vocab)
        if spec.caption_layers:  # a caption decoder reading the image tower's projected tokens
            if spec.caption_input not in ("tokens", "embedding", "prefix", "text"):
                raise UserError(
                    f"model caption_input must be tokens, embedding, prefix or text, not {spec.caption_input!r}."
                )
            self.captioner = caption_decoder_of(spec)
        if spec.match_layers < 0:
            raise UserError(
                f"model match_layers must be 0 (no matching head) or more, not {spec.match_layers}."
            )
        if spec.match_layers:  # an image–text matching head over both towers' projected tokens
            self.matcher = matcher_of(spec)
        self.temporal = temporal_of(spec)  # clips: frame embeddings → one (models.temporal)
        if spec.adapter:  # what `lipkit adapt` added (models.adapters)
            self.adapter = adapter_of(spec.adapter, spec.embed_dim, self.text)

    def add_adapter(self, settings: dict, module: nn.Module) -> None:
        """Attach what `lipkit adapt` trained (`module`, described by `settings`) so checkpoints restore it."""
        self.spec = replace(self.spec, adapter=dict(settings))
        self.adapter = module

    @property
    def image_adapter(self) -> ImageAdapter | None:
        """CLIP-Adapter's residual MLP on the image features, when this model has one."""
        adapter = getattr(self, "adapter", None)
        return adapter if isinstance(adapter, ImageAdapter) else None

    @property
    def pseudo_word(self) -> PseudoWord | None:
        """Pic2Word's mapping network (composed queries, models.pseudo_word), when this model has one."""
        adapter = getattr(self, "adapter", None)
        return adapter if isinstance(adapter, PseudoWord) else None

    @property
    def has_captioner(self) -> bool:
        return self.spec.caption_layers > 0

    def add_captioner(
        self, layers: int, width: int = 0, heads: int = 4, reads: str = "tokens", queries: int = 8
    ) -> None:
        """A fresh caption decoder on this model (a checkpoint trained without one: `model.init_from`),
        reading the image tokens, (`reads="embedding"`) one embedding or (`"prefix"`) `queries` soft prompts."""
        spec = replace(
            self.spec,
            caption_layers=layers,
            caption_width=width,
            caption_heads=heads,
            caption_input=reads,
            caption_queries=queries,
        )
        self.captioner = caption_decoder_of(spec).to(self.device)  # refusals first: the spec stays consistent
        self.spec = spec

    @property
    def caption_reader(self) -> CaptionDecoder | PrefixDecoder | TextReading:
        """What caption_nll and beam search drive: the decoder, or a text-reading decoder with the text tower."""
        return TextReading(self.captioner, self.text) if self.spec.caption_input == "text" else self.captioner

    @property
    def has_matcher(self) -> bool:
        return self.spec.match_layers > 0

    def add_matcher(self, layers: int, width: int = 0, heads: int = 4) -> None:
        """A fresh image–text matching head on this model (a checkpoint trained without one)."""
        self.spec = replace(self.spec, match_layers=layers, match_width=width, match_heads=heads)
        self.matcher = matcher_of(self.spec).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed_images_u8(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) at the model's size → float32 (B, D) L2-normalised embeddings on the CPU,
        normalised with the model's own image mean/std (what eval, embed and search all need)."""
        x = normalize_pixels(images_u8, self.spec.image_mean, self.spec.image_std).to(self.device)
        return self.encode_image(x).float().cpu()

    @torch.no_grad()
    def lexical_images_u8(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) → float32 (B, lexicon_vocab) LexLIP term weights on the CPU (eval and embed)."""
        x = normalize_pixels(images_u8, self.spec.image_mean, self.spec.image_std).to(self.device)
        return self.encode_image_lexical(x).float().cpu()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (B, 3, S, S) — or clips (B, T, 3, S, S): every frame through the tower, then the temporal
        head (models.temporal) — → (B, D) embeddings."""
        feats = self.image_features(images)[0]
        if self.image_adapter is not None:  # CLIP-Adapter (models.image_adapter)
            feats = self.image_adapter(feats)
        return F.normalize(feats, dim=-1) if normalize else feats

    def image_features(
        self, images: torch.Tensor, return_tokens: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image tower's pooled features (B, D) — for clips (B, T, 3, S, S), the temporal head's pooling
        of the frames' — and, when asked for, its token features (images only); not normalised."""
        if images.dim() != 5:
            return self.visual(images, return_tokens=True) if return_tokens else (self.visual(images), None)
        if return_tokens:
            raise UserError(
                "This objective or evaluation reads image tokens, and a clip (a `frames` sample) has one "
                "embedding; use a pooled objective (infonce, siglip, multi_positive ...) for clips."
            )
        return self.temporal.pool(self.frame_states(images)), None

    def frame_states(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (B, T, 3, S, S) → the temporal head's state of each frame (B, T, D): what it pools, and what
        objectives reading each frame see (models.temporal)."""
        return self.temporal.states(self.frame_features(clips))

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (B, T, 3, S, S) → each frame's pooled features (B, T, D), not normalised: through the image
        tower frame by frame, or through EZ-CLIP's prompted tower (models.frame_prompts)."""
        if isinstance(self.temporal, FramePrompts):
            return self.temporal.frames(self.visual, clips)
        return self.visual(clips.flatten(0, 1)).unflatten(0, tuple(clips.shape[:2]))

    def add_temporal(self, kind: str, layers: int = 1, heads: int = 4, frames: int = 64) -> None:
        """A fresh temporal head on this model (a checkpoint trained on images: `model.init_from`)."""
        spec = replace(
            self.spec, temporal=kind, temporal_layers=layers, temporal_heads=heads, temporal_frames=frames
        )
        self.temporal = temporal_of(spec).to(self.device)  # refusals first: the spec stays consistent
        self.spec = spec

    def encode_region(self, images: torch.Tensor, boxes, normalize: bool = True) -> torch.Tensor:
        """Images (B, 3, S, S) and boxes — a list with each image's (n_i, 4) boxes (x0, y0, x1, y1 as
        fractions of the side), or (R, 5) rows (image index, box) — → (R, D) region embeddings pooled
        from the image tower's token grid (models.regions), image by image in order."""
        require_patch_grid(self.spec, "Region embedding")
        _, tokens = self.visual(images, return_tokens=True)
        feats = region_pool(tokens, as_rois(boxes, tokens.device))
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.text(ids)
        return F.normalize(feats, dim=-1) if normalize else feats

    def set_checkpointing(self, image: bool, text: bool) -> None:
        """Activation checkpointing per tower: the tower's blocks are recomputed in the backward instead of
        keeping their activations (less memory, one more forward of that tower per step)."""
        if isinstance(self.visual, TimmTower):
            self.visual.set_checkpointing(image)
        else:
            self.visual.transformer.checkpointing = image
        if isinstance(self.text, HFTextTower):
            self.text.set_checkpointing(text)
        else:
            self.text.transformer.checkpointing = text

    def compile_towers(self) -> None:
        """torch.compile each tower in place (`nn.Module.compile`: parameter names and checkpoints stay the
        same). The first step pays the compilation (~30–60 s for the tiny model on a CPU)."""
        self.visual.compile()
        self.text.compile()

    @property
    def has_lexicon(self) -> bool:
        return self.spec.lexicon_vocab > 0

    def encode_image_lexical(self, images: torch.Tensor) -> torch.Tensor:
        """Images → (B, lexicon_vocab) non-negative term weights (needs `spec.lexicon_vocab`)."""
        _, tokens = self.visual(images, return_tokens=True)
        return self.image_lexicon(F.normalize(tokens, dim=-1))

    def encode_text_lexical(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids → (B, lexicon_vocab) non-negative term weights; padding never contributes."""
        _, tokens = self.text(ids, return_tokens=True)
        return self.text_lexicon(F.normalize(tokens, dim=-1), ids != self.spec.pad_id)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as in CLIP so the temperature cannot collapse."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(ids),
            "logit_scale": self.scale(),
        }

    def lock(self, tower: str, mode: str) -> None:
        """LiT: freeze part of the "image" or "text" tower — "all" of it, its "backbone" (all but the
        projection), or "top-N": all but its top N layer groups and the projection (models.locking).
        Frozen modules stay in eval mode from now on (see `train`): a locked BatchNorm keeps its statistics."""
        lock_tower(self.visual if tower == "image" else self.text, mode, tower)
        self.train(self.training)

    def train(self, mode: bool = True) -> DualEncoder:
        """Train or eval mode, but a tower's frozen modules (those whose parameters all have
        requires_grad off: a locked tower, or a locked backbone without its projection) stay in eval mode:
        frozen BatchNorm statistics (no running-statistics update, no batch statistics) and no dropout."""
        super().train(mode)
        if mode:
            _frozen_to_eval(self.visual)
            _frozen_to_eval(self.text)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _frozen_to_eval(module: nn.Module) -> None:
    """Put the largest frozen sub-modules of `module` (itself included) in eval mode."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _frozen_to_eval(child)


def temporal_of(spec: ModelSpec) -> nn.Module:
    """The temporal head `spec` asks for, over the embedding dimension (EZ-CLIP's: inside the ViT tower)."""
    if spec.temporal == "ezclip":
        if spec.vision_tower != "vit" or spec.vision_attn_pool:
            raise UserError(
                "model temporal ezclip prompts lipkit's own ViT tower (vision_tower vit, no vision_attn_pool); "
                "use temporal mean, transformer or attention for this image tower."
            )
        return FramePrompts(spec.vision_width, spec.vision_layers, spec.temporal_frames, spec.patch_size)
    return temporal_head_of(
        spec.temporal, spec.embed_dim, spec.temporal_layers, spec.temporal_heads, spec.temporal_frames
    )


def caption_decoder_of(spec: ModelSpec) -> CaptionDecoder | PrefixDecoder:
    """The caption decoder `spec` asks for, over its tokenizer's vocabulary and context."""
    width = spec.caption_width or spec.embed_dim
    _check_heads("caption decoder", width, spec.caption_heads, "caption")
    if spec.caption_input == "prefix":  # a language model reading the image as soft prompts
        return PrefixDecoder(
            spec.vocab_size,
            width,
            spec.caption_layers,
            spec.caption_heads,
            spec.context_length,
            spec.embed_dim,
            spec.caption_queries,
        )
    reads_text = spec.caption_input == "text"
    if reads_text and (spec.text_tower != "transformer" or not spec.text_embed_cls):
        raise UserError(
            "A caption decoder reading the text tower's states (caption_input 'text', OpenCLIP's CoCa) needs "
            "lipkit's causal text tower with a [cls] token; set model text_embed_cls=true, or caption_input tokens."
        )
    if reads_text and not width == spec.text_width == spec.embed_dim:
        raise UserError(
            f"A caption decoder reading the text tower's states (caption_input 'text') must be as wide as the "
            f"text tower and the image tokens; set caption_width, text_width and embed_dim equal (now {width}, "
            f"{spec.text_width}, {spec.embed_dim})."
        )
    return CaptionDecoder(
        spec.vocab_size,
        width,
        spec.caption_layers,
        spec.caption_heads,
        spec.context_length,
        spec.embed_dim,
        text_only=spec.caption_input == "embedding",
        reads_text=reads_text,
        quick_gelu=spec.quick_gelu and reads_text,
    )


def matcher_of(spec: ModelSpec) -> MatchingHead:
    """The image–text matching head `spec` asks for, over the embedding space's token features."""
    width = spec.match_width or spec.embed_dim
    _check_heads("matching head", width, spec.match_heads, "match")
    return MatchingHead(spec.embed_dim, width, spec.match_layers, spec.match_heads)


def _check_heads(what: str, width: int, heads: int, prefix: str) -> None:
    """Refuse a head count that does not divide the head's width, in one sentence naming the settings."""
    if heads < 1 or width % heads:
        raise UserError(
            f"The {what}'s width {width} must divide into model {prefix}_heads={heads} heads; "
            f"set model.overrides.{prefix}_heads (or {prefix}_width) so that it does."
        )
