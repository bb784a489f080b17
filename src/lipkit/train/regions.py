"""Per-sample boxes and region captions by record key, for objectives that align regions with text (CLOC's
region–text contrast): read from two list columns of the training table — the boxes (x0, y0, x1, y1 as
fractions of the square the model sees) and one caption per box — and looked up, like the sample labels,
by the stable sample ids the trainer makes from the batch's record keys (train.inputs.sample_ids).

Each sample holds up to R regions (R: the most any row has); shorter rows are padded and marked invalid.
Region captions are tokenized once, up front, with the run's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lipkit.data.records import Record
from lipkit.data.regions import row_regions
from lipkit.errors import UserError
from lipkit.train.inputs import sample_ids


class RegionTable:
    """Sorted sample ids, their (n, R, 4) boxes, (n, R, L) caption token ids and (n, R) validity."""

    def __init__(self, keys: list[str], boxes: list[list], captions: list[list[str]], tokenizer: Any) -> None:
        width = max([1, *(len(b) for b in boxes)])
        n, length = len(keys), tokenizer.context_length
        self.boxes = torch.zeros(n, width, 4)
        self.ids = torch.full((n, width, length), tokenizer.pad_id, dtype=torch.int64)
        self.valid = torch.zeros(n, width, dtype=torch.bool)
        flat = [c for per in captions for c in per]
        tokens = tokenizer(flat) if flat else torch.zeros(0, length, dtype=torch.int64)
        at = 0
        for i, (b, c) in enumerate(zip(boxes, captions, strict=True)):
            m = len(c)
            if m:
                self.boxes[i, :m] = torch.tensor(b, dtype=torch.float32)
                self.ids[i, :m] = tokens[at : at + m]
                self.valid[i, :m] = True
            at += m
        keyed = sample_ids(keys)
        order = keyed.argsort()
        self.keys = keyed[order]
        self.boxes, self.ids, self.valid = self.boxes[order], self.ids[order], self.valid[order]
        self.regions = int(self.valid.sum())
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_records(
        cls, records: Sequence[Record], boxes_column: str, captions_column: str, tokenizer: Any, where: str
    ) -> RegionTable:
        """The regions of a table's rows (rows repeating a key: the first one's regions)."""
        seen: dict[str, tuple[list, list[str]]] = {}
        for r in records:
            if r.key not in seen:
                seen[r.key] = row_regions(r, boxes_column, captions_column, where)
        if not any(b for b, _ in seen.values()):
            raise UserError(
                f"No row of {where} has regions in the columns '{boxes_column}' and '{captions_column}' the objective "
                "reads; train on a table with boxes (e.g. `lipkit data build canvases`) or set the objective's columns."
            )
        return cls(list(seen), [b for b, _ in seen.values()], [c for _, c in seen.values()], tokenizer)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, R, 4) boxes, (B, R, L) token ids and (B, R) validity of these sample ids (unknown ids: none)."""
        if ids.device not in self._on:
            self._on[ids.device] = tuple(
                t.to(ids.device) for t in (self.keys, self.boxes, self.ids, self.valid)
            )
        keys, boxes, tokens, valid = self._on[ids.device]
        pos = torch.searchsorted(keys, ids).clamp(max=len(keys) - 1)
        found = keys[pos] == ids
        return boxes[pos], tokens[pos], valid[pos] & found[:, None]
