"""Region embeddings pooled from a tower's token grid (the localisation literature's region features:
CLOC's promptable embeddings, here by RoIAlign rather than CLOC's Prompter transformer).

A box is (x0, y0, x1, y1) in fractions of the square image the model sees (after lipkit's resize and
centre crop). The tower's (B, N, D) tokens are its h × w = N grid (square: h = w = √N), token (r, c)
covering [c/w, (c+1)/w) × [r/h, (r+1)/h) of the image with its centre at ((c + ½)/w, (r + ½)/h). The
region's feature is the mean of the token grid read by bilinear interpolation between token centres
(clamped at the border) at BINS × BINS bins of SAMPLES × SAMPLES points each, evenly spread over the box:
torchvision's `roi_align` with `aligned=True`. For a CNN tower whose pooled embedding is the mean of its
projected tokens (timm's average pool before a linear head), a region is read from the same space as the
whole image; for lipkit's ViT (class-token pooling) the region term is what puts it there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lipkit.errors import UserError

BINS, SAMPLES = 4, 2


def require_patch_grid(spec, what: str) -> None:
    """Refuse, in one sentence, `what` on an image tower whose tokens are an attentional pooler's queries."""
    if getattr(spec, "vision_attn_pool", 0):
        raise UserError(
            f"{what} reads the image tower's patch grid, and this checkpoint's tower ends in an attentional "
            "pooler (model vision_attn_pool, OpenCLIP's CoCa) whose tokens are queries, not patches; use a "
            "checkpoint without one."
        )


def grid_side(tokens: torch.Tensor) -> int:
    """√N of (B, N, D) tokens; a grid that is not square is refused."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"region pooling needs a square token grid, got {tokens.shape[1]} tokens")
    return side


def as_rois(boxes: torch.Tensor | Sequence[Sequence[Sequence[float]]], device=None) -> torch.Tensor:
    """Boxes per image — a list (one entry per image) of (n_i, 4) boxes, or an (R, 5) tensor already of
    rows (image index, x0, y0, x1, y1) — as (R, 5) float rows."""
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes as a tensor must be (R, 5) rows (image, x0, y0, x1, y1), got {tuple(boxes.shape)}"
            )
        return boxes.to(device) if device is not None else boxes
    rows = [[float(i), *map(float, b)] for i, per_image in enumerate(boxes) for b in per_image]
    if any(len(r) != 5 for r in rows):
        raise ValueError("each box must be 4 numbers (x0, y0, x1, y1), fractions of the image side")
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(-1, 5)


def region_pool(tokens: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens and (R, 5) rois → (R, D) region features (see the module doc)."""
    from torchvision.ops import roi_align  # here: importing torchvision.ops imports torch._dynamo (~150 MB)

    side = grid_side(tokens)
    b, _, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, d, side, side)
    # in float32 at least: a bf16 image index would be rounded (257 → 256) and read another image's grid
    work = torch.promote_types(grid.dtype, torch.float32)
    scaled = torch.cat([rois[:, :1], rois[:, 1:] * side], dim=1).to(work)
    pooled = roi_align(
        grid.to(work), scaled, output_size=BINS, spatial_scale=1.0, sampling_ratio=SAMPLES, aligned=True
    )
    return pooled.mean(dim=(2, 3)).to(grid.dtype)
