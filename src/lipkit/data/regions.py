"""Boxes with one caption each, as two list columns of a table (`boxes`: [x0, y0, x1, y1] fractions of the
square image the model sees; `object_captions`: one caption per box — what `lipkit data build canvases`
writes): the one check of a row's regions, shared by training (train.regions) and evaluation (eval.regions).
"""

from __future__ import annotations

from lipkit.data.records import Record
from lipkit.errors import UserError

BOXES, CAPTIONS = "boxes", "object_captions"


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
