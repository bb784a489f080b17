"""Text tower: token + position embeddings → causal pre-norm transformer → end-of-text token → projection.

Padding comes after the end-of-text token, and attention is causal, so padding never changes the
pooled feature.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.presets import ModelSpec
from lipkit.models.transformer import Transformer


class TextTransformer(nn.Module):
    def __init__(self, spec: ModelSpec, pad_id: int = 0) -> None:
        super().__init__()
        w = spec.text_width
        self.pad_id = pad_id
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
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        eot = (ids != self.pad_id).sum(dim=1).clamp(min=1) - 1  # last real token = end-of-text
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        if return_tokens:
            return pooled, x @ self.text_projection
        return pooled
