"""A caption decoder on top of the two towers (CoCa's captioning head, Yu et al., 2022, "CoCa: Contrastive
Captioners are Image-Text Foundation Models", as lipkit builds it).

A causal transformer over the caption's tokens: each layer is a causal self-attention block followed by a
cross-attention block whose keys and values are the image tower's projected token features (layer norms
`ln_1` / `ln_1_kv` / `ln_2` and an MLP, named as OpenCLIP's CoCa decoder names them), then `ln_final`
and a linear map to the vocabulary. It predicts token t + 1 from tokens ≤ t and the image:

    p(w_{t+1} | w_≤t, image) = softmax(W_out · h_t),   L_cap = −1/T Σ_t log p(w_{t+1} | w_≤t, image)

over the real target tokens (not padding) of the batch.

What differs from CoCa: CoCa's multimodal decoder reads the outputs of its own unimodal (causal) text
encoder; lipkit's decoder embeds the tokens itself, because lipkit's text towers may be bidirectional
(the pretrained MiniLM), which would let the decoder see the word it predicts. The image side is the
tower's token grid in the embedding space (no attentional pooler).

`reads_text=True` is CoCa as OpenCLIP builds it (`caption_input: text`): no embeddings of its own — the
decoder reads the causal text tower's token states before its final norm (`TextReading`: the text tower
must have a [cls] token, models.text) and the image tower's attentional-pooler tokens as they are (no
`image_proj`, so their width must be the decoder's); its MLPs use the towers' activation (QuickGELU or GELU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.models.transformer import Mlp, ResidualBlock


class CrossAttentionBlock(nn.Module):
    """x + attn(ln_1(x), ln_1_kv(image)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.ln_1_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu=quick_gelu)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        kv = self.ln_1_kv(image)
        x = x + self.attn(self.ln_1(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CaptionDecoder(nn.Module):
    """Token ids (B, L) and image tokens (B, N, image_dim) → next-token logits (B, L, vocab)."""

    def __init__(
        self,
        vocab: int,
        width: int,
        layers: int,
        heads: int,
        context_length: int,
        image_dim: int,
        text_only: bool = False,
        reads_text: bool = False,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.reads_text = reads_text
        if not reads_text:
            self.token_embedding = nn.Embedding(vocab, width)
            self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
            self.image_proj = nn.Linear(image_dim, width)
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, 4.0, quick_gelu) for _ in range(layers))
        self.cross_attn = nn.ModuleList(
            CrossAttentionBlock(width, heads, 4.0, quick_gelu) for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, vocab, bias=False)
        if text_only:  # the std of the Gaussian noise its training adds to text embeddings (−1: not set
            # yet; objectives.capdec), kept with the weights so that a resumed run reuses it
            self.register_buffer("noise_std", torch.tensor(-1.0))
        if not reads_text:  # (in this order: a seed gives the weights it gave before text-reading decoders)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def forward(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.hidden(ids, image_tokens))

    def last_logits(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, vocab) next-token logits after each sequence's last position (decoding: only that position
        reaches the vocabulary projection)."""
        return self.text_projection(self.hidden(ids, image_tokens)[:, -1])

    def hidden(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, width) final-normed states; `forward` maps them to the vocabulary. `ids`: token ids, or for
        a text-reading decoder the text tower's (B, L, width) token states (`TextReading` passes them)."""
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens, more than the decoder's context of {self.context_length}")
        if self.reads_text:
            x, image = ids, image_tokens.to(ids.dtype)
        else:
            x = self.token_embedding(ids) + self.positional_embedding[:length]
            image = self.image_proj(image_tokens.to(x.dtype))
        for block, cross in zip(self.resblocks, self.cross_attn, strict=True):
            x = cross(block(x, causal=True), image)
        return self.ln_final(x)


class TextReading:
    """A text-reading decoder (`reads_text`) with the text tower it reads, behind the interface of a decoder
    over token ids (`hidden`, `last_logits`, `text_projection`, `context_length`) that caption_nll and beam
    search use. Not a module: the two modules stay where they are in the model (and its state dict)."""

    def __init__(self, decoder: CaptionDecoder, text: nn.Module) -> None:
        self.decoder, self.text = decoder, text
        self.context_length = decoder.context_length
        self.text_projection = decoder.text_projection

    def hidden(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder.hidden(self.text(ids, states=True), image_tokens)

    def last_logits(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.hidden(ids, image_tokens)[:, -1])


def caption_nll(
    decoder: nn.Module, ids: torch.Tensor, image_tokens: torch.Tensor | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: (B,) summed negative log-likelihood of each caption's real tokens after the first
    (the start token is given), and (B,) how many such tokens each caption has. `decoder`: this module's
    CaptionDecoder or a models.prefix_decoder.PrefixDecoder (whose `image_tokens` may be None: text
    alone). The columns after the batch's longest caption are dropped and only real target positions
    reach the vocabulary projection (padding is most of a batch of short captions; the projection and its
    softmax dominate the cost)."""
    real_ids = ids != pad_id
    longest = int(real_ids.any(0).nonzero().max()) + 1 if real_ids.any() else 1
    ids = ids[:, : max(2, longest)]
    target = ids[:, 1:]
    real = target != pad_id
    states = decoder.hidden(ids[:, :-1], image_tokens)[real]  # (T, width), the predicting positions
    logits = decoder.text_projection(states)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the loss in fp32
    nll = F.cross_entropy(logits, target[real], reduction="none")  # (T,)
    rows = real.nonzero()[:, 0]
    per_caption = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return per_caption, real.sum(1)
