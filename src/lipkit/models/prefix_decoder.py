"""A decoder-only language model that reads an image as a prefix of soft prompts (the LLaVA / BLIP-2 /
VPGTrans line at small scale: image tokens → a connector → a causal text decoder).

The language model is a causal transformer over token embeddings plus learned positions, final layer norm
and a linear map to the vocabulary; alone (no image) it is an ordinary text language model, which
objectives.text_lm pre-trains on captions. The connector turns the image tower's projected tokens into Q
soft prompts in the language model's input space, in two parts as VPGTrans (Zhang et al., 2023, "Transfer
Visual Prompt Generator across LLMs") names them:

- the visual prompt generator (VPG): Q learnable queries, one block of self-attention among them, one of
  cross-attention to the image tokens and an MLP — a one-layer Q-Former (BLIP-2's VPG) at the image
  tower's embedding width with heads set by that width (`vpg_heads`), so its shape does not depend on the
  language model it feeds;
- the projector: a linear map from that width to the language model's width.

The prompts are prepended to the caption's token embeddings and the whole sequence runs causally, as a
decoder-only LLM reads its soft prompt:

    P = W_proj · VPG(image tokens) + b,   h = LM([P; E·w + pos]),   p(w_{t+1} | w_≤t, image) = softmax(W_out h_t)

The prompts take no positional embedding, so the caption's positions are those of text-only pre-training
and with no image the model is exactly that language model. What differs from the papers: their
language models are pre-trained LLMs (OPT, FlanT5, Vicuna); here both are small causal transformers
pre-trained on the training captions, and the VPG is one layer, not BLIP-2's 12-layer Q-Former.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.caption_decoder import CrossAttentionBlock
from lipkit.models.transformer import ResidualBlock


class PromptGenerator(nn.Module):
    """Image tokens (B, N, D) → Q prompt vectors (B, Q, D): queries, self-attention, cross-attention, MLP."""

    def __init__(self, dim: int, queries: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.self_attn = ResidualBlock(dim, heads, 4.0, False)
        self.cross = CrossAttentionBlock(dim, heads, 4.0)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        q = self.queries.to(image_tokens.dtype).expand(image_tokens.shape[0], -1, -1)
        return self.cross(self.self_attn(q), image_tokens)


def vpg_heads(image_dim: int) -> int:
    """The VPG's attention heads: about one per 64 dimensions of the image embedding, a divisor of it —
    set by the image side alone, so that a VPG fits every language model on the same image tower."""
    return next(h for h in range(max(1, image_dim // 64), 0, -1) if image_dim % h == 0)


class Connector(nn.Module):
    """The VPG and the linear projector into a language model of width `width`."""

    def __init__(self, image_dim: int, width: int, queries: int) -> None:
        super().__init__()
        self.vpg = PromptGenerator(image_dim, queries, vpg_heads(image_dim))
        self.projector = nn.Linear(image_dim, width)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vpg(image_tokens))


class PrefixDecoder(nn.Module):
    """Token ids (B, L) and, optionally, image tokens (B, N, image_dim) → next-token logits (B, L, vocab).

    The same interface as models.caption_decoder.CaptionDecoder (`hidden`, `last_logits`,
    `text_projection`, `context_length`), so teacher forcing and beam search treat both alike."""

    def __init__(
        self,
        vocab: int,
        width: int,
        layers: int,
        heads: int,
        context_length: int,
        image_dim: int,
        queries: int,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, 4.0, False) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, vocab, bias=False)
        self.connector = Connector(image_dim, width, queries)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def forward(self, ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_projection(self.hidden(ids, image_tokens))

    def last_logits(self, ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, vocab) next-token logits after each sequence's last position."""
        return self.text_projection(self.hidden(ids, image_tokens)[:, -1])

    def hidden(self, ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, width) final-normed states of the caption's positions (the prompts' are dropped)."""
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens, more than the decoder's context of {self.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        if image_tokens is not None:
            x = torch.cat([self.connector(image_tokens.to(x.dtype)), x], dim=1)
        for block in self.resblocks:
            x = block(x, causal=True)
        return self.ln_final(x[:, x.shape[1] - length :])

    def language_model_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the connector's: what connector training keeps frozen."""
        return [p for name, p in self.named_parameters() if not name.startswith("connector.")]
