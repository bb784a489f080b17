"""Temporal heads: what turns a clip's (or a slice stack's) per-frame embeddings (B, T, D) — each frame
through the image tower and its projection — into one clip embedding (B, D). `DualEncoder.encode_image`
runs every (B, T, 3, S, S) input through one of these (model `temporal`):

- `mean` (the default, and what any image model does with a clip): the frames' mean. Order-blind: a clip
  and its time reverse get the same embedding.
- `transformer`: a small pre-norm transformer over the frames with learned positions (CLIP4Clip's
  "sequential transformer" on frozen frame features), in a residual around its blocks:
  h = x + p, out = mean_t (x + Blocks(h) − h). Every block's output projections start at zero, so
  Blocks(h) = h exactly and the head starts as mean pooling (T = 1: the image embedding itself).
- `attention`: RadCLIP's slice pooling as its paper describes it (no reference code was published): one
  multi-head self-attention block over the slices without positions, then attention pooling by a
  learned query — per head k, a_t = softmax_t(q_k · W_k LN(h_t) / √d_k), out_k = Σ_t a_t h_{t,k}. No
  positions anywhere, so it is invariant to the order of the slices; the query and the block's output
  projections start at zero (uniform weights: mean pooling; T = 1: the image embedding).

EZ-CLIP's temporal prompts act inside the tower: models/frame_prompts.py (model `temporal: ezclip`).
GLSCL's shared queries read these heads' frame states inside its objective (objectives/glscl.py).
Not implemented: video-specific image towers (3-D convolutions, divided space–time attention).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipkit.errors import UserError
from lipkit.models.transformer import ResidualBlock

TEMPORAL_KINDS = ("mean", "transformer", "attention")


class TemporalHead(nn.Module):
    """Frame embeddings (B, T, D) → per-frame states (B, T, D) → one pooled embedding (B, D). The states are
    what objectives reading each frame see (EZ-CLIP's motion loss, VDI's dynamics)."""

    def states(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pool(self, states: torch.Tensor) -> torch.Tensor:
        return states.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.states(x))


class MeanPool(TemporalHead):
    pass


def _zero_block(width: int, heads: int) -> ResidualBlock:
    """A pre-norm residual block whose branches start at zero (the block starts as the identity)."""
    block = ResidualBlock(width, heads, 4.0, quick_gelu=False)
    for proj in (block.attn.out_proj, block.mlp.c_proj):
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
    return block


class TemporalTransformer(TemporalHead):
    def __init__(self, width: int, layers: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.positions = nn.Parameter(torch.randn(max_frames, width) * 0.02)
        self.blocks = nn.ModuleList(_zero_block(width, heads) for _ in range(layers))

    def states(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.positions.shape[0]:
            raise UserError(
                f"The temporal transformer has positions for {self.positions.shape[0]} frames, not {t}; "
                f"lower data.num_frames or train with model.overrides.temporal_frames={t}."
            )
        h0 = x + self.positions[:t].to(x.dtype)
        h = h0
        for block in self.blocks:
            h = block(h)
        return x + (h - h0)


class SlicePooling(TemporalHead):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.block = _zero_block(width, heads)
        self.ln = nn.LayerNorm(width)
        self.key = nn.Linear(width, width)
        self.query = nn.Parameter(torch.zeros(heads, width // heads))

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, heads) attention weights of the slices (summing to 1 over T)."""
        b, t, d = h.shape
        k = self.key(self.ln(h)).view(b, t, self.heads, d // self.heads)
        scores = (k * self.query.to(k.dtype)).sum(-1) / math.sqrt(d // self.heads)
        return scores.float().softmax(dim=1)

    def states(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        a = self.weights(h).float()  # the weighted sum in float32: bf16 weights would not sum to 1
        pooled = (a.unsqueeze(-1) * h.float().view(b, t, self.heads, d // self.heads)).sum(1)
        return pooled.reshape(b, d).to(h.dtype)


def temporal_head_of(kind: str, width: int, layers: int, heads: int, max_frames: int) -> nn.Module:
    """The head for model `temporal` ("" is mean pooling)."""
    kind = kind or "mean"
    if kind not in TEMPORAL_KINDS:
        raise UserError(f"model temporal must be one of {', '.join(TEMPORAL_KINDS)} or ezclip, not {kind!r}.")
    if kind != "mean" and (heads < 1 or width % heads):
        raise UserError(
            f"The temporal head's width {width} (model embed_dim) must divide into temporal_heads={heads} "
            "heads; set model.overrides.temporal_heads so that it does."
        )
    if kind == "transformer":
        if layers < 1 or max_frames < 1:
            raise UserError(
                "model temporal_layers and temporal_frames must be 1 or more for a transformer head."
            )
        return TemporalTransformer(width, layers, heads, max_frames)
    if kind == "attention":
        return SlicePooling(width, heads)
    return MeanPool()
