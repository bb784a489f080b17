"""Image preprocessing and batch augmentation.

Images are decoded once to uint8 RGB at the model's size (transparent pixels composited on white).
Training augmentation runs on whole batches as one affine warp (random scale/crop, shift, small
rotation, optional mirror): cheap on a CPU and identical in every data worker setup.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs

# Why an image could not be used; `try_load_image` returns one of these names.
IMAGE_REASONS = {
    "missing_file": "the image file does not exist",
    "unreadable_file": "the image file cannot be read (permissions)",
    "empty_file": "the image file is empty (0 bytes)",
    "not_an_image": "the file is not an image (unknown format)",
    "corrupt_image": "the image is truncated or corrupt",
    "too_large": f"the image has more than {Image.MAX_IMAGE_PIXELS:,} pixels (decompression bomb limit)",
}
_ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa", "P")
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency composited on white, 16/32-bit and float grey rescaled,
    CMYK/YCbCr/HSV/1-bit converted."""
    if im.mode in _INT_MODES or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif im.mode.startswith("I;16") or (a.size and a.max() <= 65535):
            a = a / 257.0  # 16-bit range
        else:
            a = a * (255.0 / a.max())
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "La":
        im = im.convert("LA")
    if im.mode in _ALPHA_MODES and (im.mode != "P" or "transparency" in im.info):
        with warnings.catch_warnings():  # palette + transparency: converting to RGBA is the fix it asks for
            warnings.simplefilter("ignore", UserWarning)
            im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos); a damaged EXIF block is ignored, not fatal."""
    try:
        if im.getexif().get(0x0112, 1) != 1:
            return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - orientation is a nicety; the pixels are what matter
        pass
    return im


def load_image(path: str | Path | BinaryIO | bytes, size: int) -> torch.Tensor:
    """Decode an image (a path, a binary file object or encoded bytes) to a uint8 tensor (3, size, size):
    EXIF orientation applied, alpha on white, any mode to RGB, resized, centre-cropped.

    Raises `Image.DecompressionBombError` above `Image.MAX_IMAGE_PIXELS` pixels, OSError and friends
    when the file is missing, not an image or corrupt (`try_load_image` names the reason instead)."""
    src = io.BytesIO(path) if isinstance(path, bytes | bytearray | memoryview) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's notes on odd metadata: the pixels decide
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(src) as im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} pixels exceed the limit of {Image.MAX_IMAGE_PIXELS}"
                )
            im.load()
            im = _to_rgb(_orient(im))
    w, h = im.size
    s = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\0", b"MM\0*")


def _has_image_magic(src: str | Path | bytes) -> bool:
    try:
        if isinstance(src, bytes | bytearray | memoryview):
            head = bytes(src[:12])
        else:
            with open(src, "rb") as f:
                head = f.read(12)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def try_load_image(src: str | Path | bytes, size: int) -> tuple[torch.Tensor | None, str, str]:
    """`load_image` that never raises on bad input: (image, "", "") or (None, reason, detail), where
    reason is a key of IMAGE_REASONS."""
    try:
        if isinstance(src, bytes | bytearray | memoryview):
            if len(src) == 0:
                return None, "empty_file", "0 bytes"
        elif isinstance(src, str | Path) and Path(src).is_file() and Path(src).stat().st_size == 0:
            return None, "empty_file", "0 bytes"
        return load_image(src, size), "", ""
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        return None, "missing_file", e.strerror or str(e)
    except PermissionError as e:
        return None, "unreadable_file", e.strerror or str(e)
    except UnidentifiedImageError:
        if _has_image_magic(src):  # a known format whose header is cut short or damaged
            return None, "corrupt_image", "damaged image header"
        return None, "not_an_image", "unknown image format"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, "too_large", str(e).split(".")[0]
    except MemoryError:
        return None, "too_large", "out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - PIL raises many types on damaged data; all mean "corrupt"
        return None, "corrupt_image", f"{type(e).__name__}: {e}"[:200]


def normalize(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - m) / s


def jitter_colour(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Per image: brightness, contrast and saturation each scaled by a factor in [1-s, 1+s] (hue is kept:
    the colour of a thing is often what its caption says). `images` in [0, 1], (B, 3, H, W)."""
    b = images.shape[0]
    f = 1 + (torch.rand(3, b, 1, 1, 1, generator=generator) * 2 - 1) * strength
    grey = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = images * f[0]  # brightness
    mean = grey.mean((2, 3), keepdim=True) * f[0]
    x = (x - mean) * f[1] + mean  # contrast around the image's mean grey
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - grey) * f[2] + grey  # saturation
    return x.clamp(0, 1)


def blur_some(images: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """A 3×3 binomial blur (σ ≈ 0.85 px) on each image with probability p: softer outlines, as another
    artist's drawing or a smaller rendering has."""
    chosen = torch.rand(images.shape[0], generator=generator) < p
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
) -> torch.Tensor:
    """Random resized crop + rotation (+ mirror) of a float batch (B, 3, H, W) in one `grid_sample`,
    after an optional colour jitter (`jitter_colour`, strength `colour`) and blur (`blur_some`, blur_p);
    those two expect pixel values in [0, 1].

    A crop keeping area fraction a ∈ [scale_min, 1] is a zoom by 1/√a; its centre moves anywhere the
    crop still fits. Pixels sampled from outside are filled from the border (white for emoji).
    """
    if colour > 0:
        images = jitter_colour(images, generator, colour)
    if blur_p > 0:
        images = blur_some(images, generator, blur_p)
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
