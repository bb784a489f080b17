"""Text tower: token + position embeddings → causal pre-norm transformer → end-of-text token → projection.

The pooled feature is taken at the first end-of-text token (`spec.eot_id`; OpenCLIP's `argmax(ids)`
finds the same position for CLIP's BPE, whose end token has the largest id). Padding comes after it
and attention is causal, so padding never changes the pooled feature.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.presets import ModelSpec
from lipkit.models.transformer import Transformer


def tracing() -> bool:
    """Whether a graph is being captured (export, compile, jit): shapes must not depend on the data."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch ≥ 2.7
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()


def trim_after_end(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Drop the columns after the last end token of the batch: exact for a causal tower pooled at the end
    token (no position attends to a later one), and short queries padded to the context length then cost
    their own length. Rows without an end token keep every column."""
    if tracing():  # a graph (ONNX export, torch.compile) keeps the full, data-independent shape
        return ids
    is_eot = ids == eot_id
    if ids.shape[1] == 0 or not bool(is_eot.any(1).all()):
        return ids
    return ids[:, : int(is_eot.int().argmax(1).max()) + 1]


class TextTransformer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        w = spec.text_width
        self.eot_id = spec.eot_id
        self.context_length = spec.context_length
        self.token_embedding = nn.Embedding(spec.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context_length, w))
        self.transformer = Transformer(w, spec.text_layers, spec.text_heads, spec.mlp_ratio, spec.quick_gelu)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, spec.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=w**-0.5)

    def forward(self, ids: torch.Tensor, return_tokens: bool = False):
        if not (self.training or return_tokens):
            ids = trim_after_end(ids, self.eot_id)
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        is_eot = ids == self.eot_id
        last = torch.full_like(
            ids[:, 0], n - 1
        )  # no end token (truncated by a foreign tokenizer): last position
        eot = torch.where(is_eot.any(1), is_eot.int().argmax(1), last)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        if return_tokens:
            return pooled, x @ self.text_projection
        return pooled
