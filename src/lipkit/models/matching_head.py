"""An image–text matching head: a small fusion transformer over one image's tokens and one caption's
tokens that scores whether they belong together (UNITER's ITM head, Chen et al., 2020, "UNITER: UNiversal
Image-TExt Representation Learning", at lipkit's scale).

Single-stream, as UNITER: the sequence [CLS; W_t·y_1 … W_t·y_L; W_v·x_1 … W_v·x_N] — a learned [CLS], the
caption's token features and the image's token features from the two towers (L2-normalised, in the shared
embedding space), each mapped by its own linear layer into the head's width and given its modality's type
embedding — runs through `layers` bidirectional pre-norm transformer blocks (padding tokens masked out of
the attention), and a linear map of the final [CLS] state gives one logit:

    s(image, caption) = w · LN(h_CLS) + b,     p(match) = σ(s)

Positions come from the towers (each tower's tokens already carry its own positional embeddings).
What differs from UNITER: its fusion is the whole 12/24-layer BERT over detected-region features; lipkit
fuses the towers' outputs with 1–2 layers (the recipe of ALBEF/BLIP's fusion heads at small scale), so the
head re-ranks a dual encoder's shortlist rather than replacing it.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.transformer import Mlp


class FusionBlock(nn.Module):
    """x + attn(ln_1(x)) over the real tokens, then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, 4 * width, quick_gelu=False)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class MatchingHead(nn.Module):
    """Image tokens (P, N, dim) and caption tokens (P, L, dim) with their (P, L) real-token mask → (P,)
    matching logits, one per (image, caption) pair."""

    def __init__(self, dim: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a matching head needs at least one layer, got {layers}")
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, width))  # no weight decay (train.optim)
        self.text_in = nn.Linear(dim, width)
        self.image_in = nn.Linear(dim, width)
        self.type_embedding = nn.Parameter(torch.zeros(3, width))  # [CLS], caption, image
        self.blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.score = nn.Linear(width, 1)
        nn.init.normal_(self.cls_embedding, std=0.02)
        nn.init.normal_(self.type_embedding, std=0.02)

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        out = self.score(self.fuse(image_tokens, text_tokens, text_mask)[:, 0]).squeeze(-1)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 scores: compared in fp32

    def fuse(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """The final states LN(h) of the whole sequence, (P, 1 + L + N, width): [CLS], the caption's tokens,
        the image's (UNITER's MLM reads the caption's: objectives.fusion_mlm)."""
        p, n = image_tokens.shape[:2]
        dtype = self.text_in.weight.dtype
        t = self.text_in(text_tokens.to(dtype)) + self.type_embedding[1]
        v = self.image_in(image_tokens.to(dtype)) + self.type_embedding[2]
        x = torch.cat(
            [(self.cls_embedding + self.type_embedding[0]).expand(p, 1, -1).to(t.dtype), t, v], dim=1
        )
        real = torch.cat([text_mask.new_ones(p, 1), text_mask.bool(), text_mask.new_ones(p, n)], dim=1).bool()
        for block in self.blocks:
            x = block(x, ~real)
        return self.ln_final(x)


def trim_text(text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns after the longest caption (the fusion's cost grows with its length)."""
    real = text_mask.bool().any(0).nonzero()
    last = int(real.max()) + 1 if len(real) else 1
    return text_tokens[:, :last], text_mask[:, :last]
