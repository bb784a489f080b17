"""The one image decode path: open (header only, with the one pixel limit), classify what went wrong,
decode to uint8 RGB at a square size. Training, evaluation, embedding, search queries, the data tools and
the report's thumbnails all open images through here.

Images are decoded to uint8 RGB (transparent pixels composited on white, EXIF orientation applied,
16-bit and float modes rescaled), resized on the short side and centre-cropped.

`style="open_clip"` decodes as CLIP_benchmark feeds OpenCLIP's evaluation preprocess instead
(`eval.protocol: clip_benchmark`): PIL `convert("RGB")` first, as its loaders do (transparency dropped
rather than put on white; no EXIF orientation), then torchvision's `Resize(size)` (the long side
truncated, not rounded) and `CenterCrop` (offsets rounded, not floored).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lipkit.data.image_policy import MAX_PIXELS

_ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa", "P")
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
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


@contextmanager
def open_image(src: str | Path | BinaryIO | bytes, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """PIL's lazy open (the header only) of a path, a binary file object or encoded bytes, refusing more
    than `max_pixels` pixels with `Image.DecompressionBombError` before anything is decoded. lipkit's
    limit decides, not PIL's process-wide one (left as it is): PIL's own warning is silenced here and its
    hard error (at twice its limit) is reported with lipkit's limit."""
    fp = io.BytesIO(src) if isinstance(src, bytes | bytearray | memoryview) else src
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's notes on odd metadata: the pixels decide
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # lipkit's limit is checked below
        try:
            opened = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise Image.DecompressionBombError(
                f"{str(e).split(' pixels')[0].removeprefix('Image size (')} pixels exceed the limit of {max_pixels}"
            ) from e
        with opened as im:
            if im.width * im.height > max_pixels:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} pixels exceed the limit of {max_pixels}"
                )
            yield im


IMAGE_STYLES = ("lipkit", "open_clip")


def upright_rgb(im: Image.Image) -> Image.Image:
    """A loaded image as lipkit decodes it before resizing: EXIF orientation applied, then RGB with
    transparency on white (`to_rgb`)."""
    return to_rgb(_orient(im))


def load_image(
    src: str | Path | BinaryIO | bytes, size: int, max_pixels: int = MAX_PIXELS, style: str = "lipkit"
) -> torch.Tensor:
    """Decode an image (a path, a binary file object or encoded bytes) to a uint8 tensor (3, size, size):
    EXIF orientation applied, alpha on white, any mode to RGB, resized, centre-cropped (`style`
    "open_clip": as OpenCLIP's evaluation preprocess, see the module docstring).

    Raises `Image.DecompressionBombError` above `max_pixels` pixels, OSError and friends when the file
    is missing, not an image or corrupt (`try_load_image` names the reason instead)."""
    with open_image(src, max_pixels) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        im.load()
        return image_pixels(im, size, style)


def image_pixels(im: Image.Image, size: int, style: str = "lipkit") -> torch.Tensor:
    """An opened PIL image as `load_image` turns a file into pixels: uint8 (3, size, size)."""
    if style not in IMAGE_STYLES:
        raise ValueError(f"image decode style must be one of {IMAGE_STYLES}, not {style!r}")
    if style == "open_clip":
        return _open_clip_pixels(im, size)
    im = upright_rgb(im)
    w, h = im.size
    s = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _open_clip_pixels(im: Image.Image, size: int) -> torch.Tensor:
    """`convert("RGB")` (CLIP_benchmark's image loaders), then torchvision `Resize(size, BICUBIC)` +
    `CenterCrop(size)`: OpenCLIP's evaluation preprocess up to `ToTensor`, pixel for pixel."""
    im = im.convert("RGB")
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if short != size:
        new_long = int(size * long / short)
        im = im.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
    w, h = im.size
    if (w, h) != (size, size):
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


_MEDIA_TYPES = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\0", "image/tiff"),
    (b"MM\0*", "image/tiff"),
)


def sniff_image_type(head: bytes) -> str:
    """The media type of encoded image bytes from their magic number (the first 12 bytes suffice), or
    "" when they start like no format lipkit reads."""
    for magic, media in _MEDIA_TYPES:
        if head.startswith(magic):
            return media
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return ""


def _has_image_magic(src: str | Path | bytes) -> bool:
    try:
        if isinstance(src, bytes | bytearray | memoryview):
            head = bytes(src[:12])
        else:
            with open(src, "rb") as f:
                head = f.read(12)
    except OSError:
        return False
    return bool(sniff_image_type(head))


def classify_failure(e: BaseException, src: str | Path | bytes) -> tuple[str, str]:
    """(reason, detail) for an exception raised while opening or decoding `src`; reason is a key of
    IMAGE_REASONS."""
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return "missing_file", e.strerror or str(e)
    if isinstance(e, PermissionError):
        return "unreadable_file", e.strerror or str(e)
    if isinstance(e, UnidentifiedImageError):
        if _has_image_magic(src):  # a known format whose header is cut short or damaged
            return "corrupt_image", "damaged image header"
        return "not_an_image", "unknown image format"
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "too_large", str(e).split(".")[0]
    if isinstance(e, MemoryError):
        return "too_large", "out of memory while decoding"
    return "corrupt_image", f"{type(e).__name__}: {e}"[:200]


def empty_source(src: str | Path | bytes) -> bool:
    """True for 0 bytes of image data, or an existing file of 0 bytes."""
    if isinstance(src, bytes | bytearray | memoryview):
        return len(src) == 0
    p = Path(src)
    return p.is_file() and p.stat().st_size == 0


def try_load_image(
    src: str | Path | bytes, size: int, max_pixels: int = MAX_PIXELS, style: str = "lipkit"
) -> tuple[torch.Tensor | None, str, str]:
    """`load_image` that never raises on bad input: (image, "", "") or (None, reason, detail), where
    reason is a key of IMAGE_REASONS."""
    try:
        if empty_source(src):
            return None, "empty_file", "0 bytes"
        return load_image(src, size, max_pixels, style), "", ""
    except Exception as e:  # noqa: BLE001 - PIL raises many types on damaged data; each is classified
        return None, *classify_failure(e, src)
