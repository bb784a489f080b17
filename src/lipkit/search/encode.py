"""The model calls that turn images and texts into what an index compares: L2-normalised dense
embeddings, LexLIP term weights for sparse indexes, and token features for token-wise (FILIP) indexes.
Used by `lipkit embed` and by queries."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lipkit.data.frames import DEFAULT_FRAMES
from lipkit.errors import UserError
from lipkit.eval.token_similarity import pooled_and_tokens
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.timm_vision import TimmTower
from lipkit.search.onnx_encoder import OnnxEncoder
from lipkit.text.tokenizer import TextTokenizer

PRECISIONS = ("fp32", "bf16")


def prepare_for_inference(model: DualEncoder, precision: str = "fp32") -> DualEncoder:
    """Eval mode; a convolutional image tower in channels-last layout (oneDNN's fast path on CPUs: ~1.5×
    at fp32, ~2× more at bf16 for the EfficientNet-Lite towers; same math). For bf16, the weights of
    linear and convolution layers are cast once here: autocast would cast exactly these to bfloat16 on
    every call (the same rounding, so the same embeddings), which cost ~20 % of a query."""
    model.eval()
    if isinstance(model.visual, TimmTower):
        model.visual.to(memory_format=torch.channels_last)
    if precision == "bf16":
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                m.to(torch.bfloat16)
    return model


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be fp32 or bf16, got '{precision}'.")
    return precision


@contextmanager
def inference_precision(model: DualEncoder, precision: str) -> Iterator[None]:
    """bf16: autocast on the model's device (embeddings still come back float32); fp32: nothing."""
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


@torch.inference_mode()
def encode_images(model: DualEncoder, images_u8: torch.Tensor) -> np.ndarray:
    """uint8 (B,3,S,S) at the model's size → float32 (B,D) L2-normalised embeddings."""
    return model.embed_images_u8(images_u8).numpy()


@torch.inference_mode()
def encode_images_lexical(model: DualEncoder, images_u8: torch.Tensor) -> np.ndarray:
    """uint8 (B,3,S,S) → float32 (B,V) non-negative term weights from the model's LexLIP image head."""
    return model.lexical_images_u8(images_u8).clamp_min(0).numpy()


@torch.inference_mode()
def encode_texts(model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str]) -> np.ndarray:
    return model.encode_text(tokenizer(list(texts)).to(model.device)).float().cpu().numpy()


@torch.inference_mode()
def encode_text_tokens(model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str]) -> np.ndarray:
    """Texts → float32 (B, context_length, D) normalised token features, zero rows at padding (a token-wise
    index reads the real tokens as the non-zero rows; eval.token_similarity.text_tokens masks them alike)."""
    ids = tokenizer(list(texts)).to(model.device)
    _, tokens = model.text(ids, return_tokens=True)
    tokens = F.normalize(tokens.float(), dim=-1) * (ids != model.spec.pad_id)[..., None]
    return tokens.cpu().numpy()


def token_wise_of(info: dict[str, Any]) -> int | None:
    """A checkpoint's token-wise setting from its training info: None when its pairs are scored by pooled
    embeddings; else the image tokens kept per image (0: all) — FILIP's and Wukong's late interaction, as
    `lipkit eval` scores them (eval.similarity_choice, `auto`)."""
    from lipkit.config import EvalConfig
    from lipkit.eval.similarity_choice import resolve_similarity, resolve_trained_settings

    trained = info.get("train", {}) or {}
    objective = trained.get("objective")
    if resolve_similarity("auto", objective) != "filip":
        return None
    return resolve_trained_settings(
        EvalConfig(), objective, trained.get("objective_args") or {}
    ).image_tokens_kept


@dataclass
class Towers:
    """What images and texts are embedded with: a PyTorch model's calls (at `precision`), or an
    `OnnxEncoder`'s (`--int8`), which has no LexLIP heads. Used by `lipkit embed` and by queries."""

    images: Callable[[torch.Tensor], np.ndarray]  # uint8 (B, 3, S, S) → (B, dim)
    texts: Callable[[list[str]], np.ndarray]  # strings → (B, dim)
    lexical: Callable[[torch.Tensor], np.ndarray] | None  # uint8 images → (B, lexicon_vocab)
    image_size: int
    dim: int
    lexicon_vocab: int = 0
    # uint8 images → ((B, dim) embeddings, (B, T, dim) tokens) in one pass, for a token-wise index
    images_and_tokens: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]] | None = None
    tokens_kept: int = 0  # image tokens kept per image for a token-wise index (0: all)
    clip_frames: int = 0  # frames decoded per clip (0: images only, as ONNX towers)

    @classmethod
    def of_model(
        cls,
        model: DualEncoder,
        tokenizer: TextTokenizer,
        precision: str = "fp32",
        token_wise: int | None = None,
    ) -> Towers:
        """`token_wise` (`token_wise_of` the checkpoint): also the image tokens, `token_wise` kept per image
        (0: all), for a token-wise index."""
        spec = model.spec

        def at_precision(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
            def call(*args: Any) -> np.ndarray:
                with inference_precision(model, precision):
                    return fn(model, *args)

            return call

        return cls(
            images=at_precision(encode_images),
            texts=at_precision(lambda m, texts: encode_texts(m, tokenizer, texts)),
            lexical=at_precision(encode_images_lexical) if model.has_lexicon else None,
            image_size=int(spec.image_size),
            dim=int(spec.embed_dim),
            lexicon_vocab=int(spec.lexicon_vocab) if model.has_lexicon else 0,
            images_and_tokens=None
            if token_wise is None
            else at_precision(
                lambda m, images: tuple(t.numpy() for t in pooled_and_tokens(m, images, token_wise or None))
            ),
            tokens_kept=token_wise or 0,
            clip_frames=spec.clip_frames or DEFAULT_FRAMES,
        )

    @classmethod
    def of_checkpoint(cls, checkpoint: Any, device: str = "auto", tokens: bool = False) -> Towers:
        """The PyTorch towers of a lipkit checkpoint folder on `device` (auto, cpu, cuda, cuda:N), with image
        tokens too when `tokens` and it is scored token-wise (`token_wise_of`; `lipkit embed` asks); on a CPU,
        freed memory is kept for the next batch (lipkit/malloc.py: no page fault per batch)."""
        from lipkit.checkpoint import load_checkpoint
        from lipkit.device import pick_device
        from lipkit.malloc import keep_freed_memory

        model, tokenizer, info = load_checkpoint(checkpoint)
        model.to(pick_device(device))
        if next(model.parameters()).device.type == "cpu":
            keep_freed_memory()
        return cls.of_model(model, tokenizer, token_wise=token_wise_of(info) if tokens else None)

    @classmethod
    def of_onnx(cls, encoder: OnnxEncoder) -> Towers:
        return cls(encoder.images, encoder.texts, None, encoder.image_size, encoder.dim)

    @property
    def has_lexicon(self) -> bool:
        return self.lexical is not None
