"""Text tower: token + position embeddings → causal pre-norm transformer → end-of-text token → projection.

The pooled feature is taken at the first end-of-text token (`spec.eot_id`; OpenCLIP's `argmax(ids)`
finds the same position for CLIP's BPE, whose end token has the largest id). Padding comes after it
and attention is causal, so padding never changes the pooled feature.

With `spec.text_embed_cls` (OpenCLIP's CoCa text tower, `embed_cls: true`) the caption is padded to the
context length C and a learned [cls] token is appended at position C; the pooled feature is
ln_final(h_cls) · text_projection. Keys are masked as OpenCLIP masks them (its default, uncorrected mask):
key 0 is always visible and key j ≥ 1 is visible when token j − 1 is not padding — every real token, the
first padding position after the caption, and the [cls] token itself only when the caption fills the
context. `states=True` returns the token states before ln_final (without the [cls] token; causal, so the
same as with it): what CoCa's multimodal decoder reads (models.caption_decoder, `caption_input: text`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError
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
        self.pad_id = spec.pad_id
        self.token_embedding = nn.Embedding(spec.vocab_size, w)
        positions = spec.context_length + 1 if spec.text_embed_cls else spec.context_length
        self.positional_embedding = nn.Parameter(torch.empty(positions, w))
        if spec.text_embed_cls:
            self.cls_emb = nn.Parameter(torch.empty(w))
            nn.init.normal_(self.cls_emb, std=0.01)
        self.transformer = Transformer(w, spec.text_layers, spec.text_heads, spec.mlp_ratio, spec.quick_gelu)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, spec.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=w**-0.5)

    def forward(self, ids: torch.Tensor, return_tokens: bool = False, states: bool = False):
        """(B, D) pooled features; with `return_tokens` also the (B, L, D) projected token features; with
        `states` (a [cls] tower only) just the (B, L, width) token states before ln_final."""
        if hasattr(self, "cls_emb"):
            return self._forward_cls(ids, return_tokens, states)
        if states:
            raise ValueError("token states are read from a text tower with a [cls] token (text_embed_cls)")
        if not (self.training or return_tokens):
            ids = trim_after_end(ids, self.eot_id)
        return self._from_embeddings(self.token_embedding(ids), ids, return_tokens)

    @property
    def max_positions(self) -> int:
        return self.context_length

    @property
    def word_width(self) -> int:
        return self.token_embedding.embedding_dim

    def word_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L, width) input word embeddings of `ids` (what a learned prompt context sits among)."""
        return self.token_embedding(ids)

    def forward_embeds(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features of input word embeddings `x` (B, L, width), `ids` (B, L) telling where
        the end token and padding are (models.prompt_context); no token-id cache is read."""
        if hasattr(self, "cls_emb"):
            raise UserError(
                "A learned prompt context needs a text tower pooled at its end token; this one is OpenCLIP "
                "CoCa's [cls] tower (model text_embed_cls): adapt it with --method lora instead."
            )
        return self._from_embeddings(x, ids, False)

    def _from_embeddings(self, x: torch.Tensor, ids: torch.Tensor, return_tokens: bool):
        n = ids.shape[1]
        x = x + self.positional_embedding[:n].to(x.dtype)
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

    def _key_mask(self, ids: torch.Tensor, length: int) -> torch.Tensor:
        """(B, 1, length, length) booleans: causal, and key j ≥ 1 only when token j − 1 is not padding."""
        valid = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), ids != self.pad_id], dim=1)[
            :, :length
        ]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        return (causal & valid[:, None, :])[:, None]

    def _forward_cls(self, ids: torch.Tensor, return_tokens: bool, states: bool):
        """The [cls] tower (module docstring): the caption padded to the context, then the [cls] token."""
        if states:
            n = ids.shape[1]
            x = self.token_embedding(ids) + self.positional_embedding[:n].to(
                self.token_embedding.weight.dtype
            )
            return self.transformer(x, mask=self._key_mask(ids, n))
        n = self.context_length
        ids = F.pad(
            ids, (0, n - ids.shape[1]), value=self.pad_id
        )  # no branch: export keeps the length dynamic
        x = self.token_embedding(ids)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = x + self.positional_embedding[: n + 1].to(x.dtype)
        x = self.transformer(x, mask=self._key_mask(ids, n + 1))
        pooled = self.ln_final(x[:, -1]) @ self.text_projection
        if return_tokens:
            return pooled, self.ln_final(x[:, :-1]) @ self.text_projection
        return pooled
