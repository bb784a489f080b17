"""Composed-retrieval queries carried by a table: a row's `composed` column lists the queries whose answer
is that row's image — each a reference image and the words that modify it,

    {"image": "shoes/red.png", "captions": [...], "composed": [{"reference": "shoes/blue.png", "text": "in red"}]}

The reference is named the way the image column names images (relative to the image root, by default the
table's folder) and must itself be a row of the same table: the table is the gallery, as in CIRR. The
scanner resolves references like image paths (`resolve_references`); `triplets` turns a split's records
into (reference row, text, target row) index triplets, counting references that are not rows.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipkit.errors import UserError

COMPOSED = "composed"


@dataclass(frozen=True)
class Triplet:
    reference: int  # row of the reference image
    text: str  # the modification
    target: int  # row of the image the query must find


def resolve_references(meta: dict[str, Any], root: Path) -> None:
    """Make a row's `composed` references paths found like its image (in place); a malformed cell is a
    UserError naming the format."""
    cell = meta.get(COMPOSED)
    if cell in (None, "", []):
        return
    if isinstance(cell, str):  # a CSV cell holds the list as JSON
        with contextlib.suppress(json.JSONDecodeError):
            cell = json.loads(cell)
    if not isinstance(cell, list) or not all(
        isinstance(q, dict) and isinstance(q.get("reference"), str) and isinstance(q.get("text"), str)
        for q in cell
    ):
        raise UserError(
            f'A \'{COMPOSED}\' cell must be a list of {{"reference": IMAGE, "text": WORDS}} queries, not '
            f"{str(cell)[:80]}; fix the table or drop the column."
        )
    meta[COMPOSED] = [{"reference": str(root / q["reference"].strip()), "text": q["text"]} for q in cell]


def has_composed(records: Sequence) -> bool:
    return any(r.meta.get(COMPOSED) for r in records)


def triplets(records: Sequence) -> tuple[list[Triplet], int]:
    """The composed queries of `records` as index triplets, and how many name a reference that is not one
    of the records (missing from the table, or an image that could not be read)."""
    row_of = {str(r.image): i for i, r in enumerate(records)}
    found: list[Triplet] = []
    missing = 0
    for target, r in enumerate(records):
        for q in r.meta.get(COMPOSED) or ():
            reference = row_of.get(str(q["reference"]))
            if reference is None or str(q["reference"]) == str(r.image):  # not a row, or the target itself
                missing += 1
                continue
            found.append(Triplet(reference, q["text"], target))
    return found, missing
