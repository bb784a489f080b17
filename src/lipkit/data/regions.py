"""Boxes with one caption each, as two list columns of a table (`boxes`: [x0, y0, x1, y1] fractions of the
square image the model sees; `object_captions`: one caption per box — what `lipkit data build canvases`
writes): the one check of a row's regions, shared by training (train.regions) and evaluation (eval.regions).
A `mask` column names a label image of the row (0 background, k the pixels of the k-th box's object); a
table resolves it like the image, relative to the table's folder or data.image_root.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lipkit.data.records import Record
from lipkit.errors import UserError

BOXES, CAPTIONS, MASK = "boxes", "object_captions", "mask"


def row_regions(r: Record, boxes_column: str, captions_column: str, where: str) -> tuple[list, list[str]]:
    """A row's boxes and their captions ([] and [] when it has neither column); a malformed row is refused."""
    boxes, captions = r.meta.get(boxes_column), r.meta.get(captions_column)
    if boxes is None and captions is None:
        return [], []
    if not isinstance(boxes, list) or not isinstance(captions, list) or len(boxes) != len(captions):
        raise UserError(
            f"Row '{r.key}' of {where} needs '{boxes_column}' and '{captions_column}' as lists of equal length "
            "(one caption per box); fix the row or drop the columns from it."
        )
    for box in boxes:
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
        if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise UserError(
                f"Row '{r.key}' of {where} has the box {box!r}; a box is [x0, y0, x1, y1], fractions of the image "
                "side with x0 < x1 and y0 < y1 (lipkit data build canvases writes them so)."
            )
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise UserError(
            f"Row '{r.key}' of {where} has an empty region caption in '{captions_column}'; give each box one."
        )
    return boxes, captions


def mask_labels(r: Record, size: int) -> torch.Tensor:
    """A row's mask as the model sees its image — (size, size) uint8 labels after the EXIF orientation,
    lipkit's resize of the short side and centre crop, nearest-neighbour so labels stay labels; a missing or
    unreadable file, or one that is not a single-channel 8-bit image, is refused."""
    path = Path(str(r.meta.get(MASK, "")))
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P"):
                raise ValueError(f"mode {im.mode}; a mask is a single-channel 8-bit image (PNG mode L or P)")
            labels = ImageOps.exif_transpose(im)
            w, h = labels.size
            s = size / min(w, h)
            if (w, h) != (size, size):
                labels = labels.resize(
                    (max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.NEAREST
                )
                left, top = (labels.width - size) // 2, (labels.height - size) // 2
                labels = labels.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(labels, dtype=np.uint8).copy())
    except (OSError, ValueError) as e:
        raise UserError(
            f"Row '{r.key}' names the mask '{path}', which cannot be read ({e}); fix the path or drop the '{MASK}' column."
        ) from None
