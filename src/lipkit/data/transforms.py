"""Image preprocessing and batch augmentation.

Images are decoded by data/images.py (uint8 RGB at the model's size). Training augmentation runs on whole batches as one affine warp (random scale/crop, shift, small
rotation, optional mirror): cheap on a CPU and identical in every data worker setup.

Under torchrun each rank augments only its own rows of the global batch (`rows`): the random numbers are
drawn for the whole global batch, in the same order on every rank, and each rank applies its window of
them, so N ranks give the images one process gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Rows = tuple[int, int]  # (first row, rows in the global batch): which draws a batch takes


def _draw(shape: tuple[int, ...], generator: torch.Generator, rows: Rows | None, n: int) -> torch.Tensor:
    """Uniform [0, 1) numbers of shape (..., n, ...) at dim len(shape) - 1 — drawn for all rows of the
    global batch and cut to this batch's window `rows` (None: the batch is the whole global batch)."""
    if rows is None:
        return torch.rand(*shape, n, generator=generator)
    start, total = rows
    return torch.rand(*shape, total, generator=generator)[..., start : start + n]


def normalize(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - m) / s


def jitter_colour(
    images: torch.Tensor, generator: torch.Generator, strength: float, rows: Rows | None = None
) -> torch.Tensor:
    """Per image: brightness, contrast and saturation each scaled by a factor in [1-s, 1+s] (hue is kept:
    the colour of a thing is often what its caption says). `images` in [0, 1], (B, 3, H, W) — or (B, 3k, H, W),
    the k frames of a clip stacked as channels, which all take the clip's factors (one draw per clip)."""
    f = 1 + (_draw((3,), generator, rows, images.shape[0]).view(3, -1, 1, 1, 1, 1) * 2 - 1) * strength
    frames = images.unflatten(1, (-1, 3))  # (B, k, 3, H, W)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 1, 3, 1, 1)
    grey = (frames * weights).sum(2, keepdim=True)
    x = frames * f[0]  # brightness
    mean = grey.mean((3, 4), keepdim=True) * f[0]
    x = (x - mean) * f[1] + mean  # contrast around each frame's mean grey
    grey = (x * weights).sum(2, keepdim=True)
    x = (x - grey) * f[2] + grey  # saturation
    return x.clamp(0, 1).flatten(1, 2)


def blur_some(
    images: torch.Tensor, generator: torch.Generator, p: float, rows: Rows | None = None
) -> torch.Tensor:
    """A 3×3 binomial blur (σ ≈ 0.85 px) on each image with probability p: softer outlines, as another
    artist's drawing or a smaller rendering has."""
    chosen = _draw((), generator, rows, images.shape[0]) < p
    if not chosen.any():
        return images
    k1 = torch.tensor([1.0, 2.0, 1.0]) / 4
    kernel = (k1[:, None] * k1[None, :]).expand(images.shape[1], 1, 3, 3).to(images.dtype)
    blurred = F.conv2d(F.pad(images[chosen], (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])
    out = images.clone()
    out[chosen] = blurred
    return out


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    scale_min: float = 0.6,
    rotate_deg: float = 10.0,
    hflip: bool = False,
    blur_p: float = 0.0,
    colour: float = 0.0,
    rows: Rows | None = None,
    scale_max: float = 1.0,
) -> torch.Tensor:
    """Random resized crop + rotation (+ mirror) of a float batch (B, 3, H, W) in one `grid_sample`,
    after an optional colour jitter (`jitter_colour`, strength `colour`) and blur (`blur_some`, blur_p);
    those two expect pixel values in [0, 1]. `rows` = (first row, global batch size) when `images` are
    rows of a larger global batch (see the module docstring).

    A crop keeping area fraction a ∈ [scale_min, scale_max] is a zoom by 1/√a; its centre moves anywhere the
    crop still fits. Pixels sampled from outside are filled from the border (white for emoji).
    """
    if colour > 0:
        images = jitter_colour(images, generator, colour, rows)
    if blur_p > 0:
        images = blur_some(images, generator, blur_p, rows)
    b = images.shape[0]
    area = scale_min + (scale_max - scale_min) * _draw((), generator, rows, b)
    zoom = area.sqrt()  # the crop's side relative to the image
    room = 1.0 - zoom
    tx = (_draw((), generator, rows, b) * 2 - 1) * room
    ty = (_draw((), generator, rows, b) * 2 - 1) * room
    angle = (_draw((), generator, rows, b) * 2 - 1) * math.radians(rotate_deg)
    flip = torch.where(_draw((), generator, rows, b) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    cos, sin = angle.cos() * zoom, angle.sin() * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
