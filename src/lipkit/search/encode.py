"""The model calls that turn images and texts into what an index compares: L2-normalised dense
embeddings, and LexLIP term weights for sparse indexes. Used by `lipkit embed` and by queries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer


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
