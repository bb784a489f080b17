"""Image preprocessing and batch augmentation.

Images are decoded once to uint8 RGB at the model's size (transparent pixels composited on white).
Training augmentation runs on whole batches as one affine warp (random scale/crop, shift, small
rotation, optional mirror): cheap on a CPU and identical in every data worker setup.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode an image file to a uint8 tensor (3, size, size): alpha on white, resized, centre-cropped."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P", "PA"):
            with (
                warnings.catch_warnings()
            ):  # palette + transparency: converting to RGBA is the fix it asks for
                warnings.simplefilter("ignore", UserWarning)
                im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        if (w, h) != (size, size):
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - m) / s


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    scale_min: float = 0.6,
    rotate_deg: float = 10.0,
    hflip: bool = False,
) -> torch.Tensor:
    """Random resized crop + rotation (+ mirror) of a float batch (B, 3, H, W) in one `grid_sample`.

    A crop keeping area fraction a ∈ [scale_min, 1] is a zoom by 1/√a; its centre moves anywhere the
    crop still fits. Pixels sampled from outside are filled from the border (white for emoji).
    """
    b = images.shape[0]
    area = torch.empty(b).uniform_(scale_min, 1.0, generator=generator)
    zoom = area.sqrt()  # the crop's side relative to the image
    room = 1.0 - zoom
    tx = (torch.rand(b, generator=generator) * 2 - 1) * room
    ty = (torch.rand(b, generator=generator) * 2 - 1) * room
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(rotate_deg)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    cos, sin = angle.cos() * zoom, angle.sin() * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
