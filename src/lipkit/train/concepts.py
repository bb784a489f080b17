"""Per-sample concepts by record key, for objectives that align image patches with the concepts a caption
names (ConceptCLIP's region–concept alignment): read from one list column of the training table — phrases
that occur in the row's captions, e.g. ["closed book", "baseball"] — and looked up, like the sample labels,
by the stable sample ids the trainer makes from the batch's record keys (train.batch_pass.sample_ids).

A concept's feature is pooled from the caption's own token features over the tokens that spell it (its
span), so each concept is tokenized once up front, without the start/end tokens, and found in the batch's
caption by its token ids. A concept the caption does not spell (another caption of the row was drawn, or
it was truncated away) is invalid for that step. Each sample holds up to K concepts (K: the most any row
has); shorter rows are padded and marked invalid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.train.batch_pass import sample_ids

Span = tuple[int, ...]


def concept_ids(texts: Sequence[str], tokenizer: Any) -> list[Span]:
    """Each text's token ids without the start/end tokens and padding (what the text spells in a caption)."""
    if not texts:
        return []
    out = []
    for row in tokenizer(list(texts)).tolist():
        while (
            row and row[-1] == tokenizer.pad_id
        ):  # a pad that is an ordinary token sits before the end token
            row.pop()
        if row and row[-1] == tokenizer.eot_id:
            row.pop()
        out.append(tuple(row[1:] if row and row[0] == tokenizer.sot_id else row))
    return out


def find_span(caption: Sequence[int], concept: Span) -> int:
    """The first position where `concept` occurs in `caption` as a run of token ids, or −1."""
    m = len(concept)
    if not m:
        return -1
    first = concept[0]
    for at in range(len(caption) - m + 1):
        if caption[at] == first and tuple(caption[at : at + m]) == concept:
            return at
    return -1


def row_concepts(r: Record, column: str, where: str) -> list[str]:
    """A row's concepts ([] when it has no such column); a malformed row is refused."""
    value = r.meta.get(column)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise UserError(
            f"Row '{r.key}' of {where} needs '{column}' as a list of non-empty phrases from its caption; fix the row "
            "or drop the column from it."
        )
    return value


class ConceptTable:
    """Sorted sample ids and, for each, the token ids of up to K concepts."""

    def __init__(self, keys: list[str], concepts: list[list[str]], tokenizer: Any) -> None:
        self.width = max([1, *(len(c) for c in concepts)])
        spans = concept_ids([c for per in concepts for c in per], tokenizer)
        self.spans: dict[int, list[Span]] = {}
        at = 0
        for key, per in zip(sample_ids(keys).tolist(), concepts, strict=True):
            self.spans[key] = spans[at : at + len(per)]
            at += len(per)
        self.concepts = at
        self.found = 1.0  # the share of concepts their row's captions spell (from_records measures it)

    @classmethod
    def from_records(cls, records: Sequence[Record], column: str, tokenizer: Any, where: str) -> ConceptTable:
        """The concepts of a table's rows (rows repeating a key: the first one's); refuses a table where no
        concept is spelled by its row's captions."""
        seen: dict[str, list[str]] = {}
        captions: dict[str, list[str]] = {}
        for r in records:
            if r.key not in seen:
                seen[r.key], captions[r.key] = row_concepts(r, column, where), r.captions
        table = cls(list(seen), list(seen.values()), tokenizer)
        if not table.concepts:
            raise UserError(
                f"No row of {where} has concepts in the column '{column}' the objective reads; give rows a list of "
                "phrases from their captions there (e.g. concepts_column=object_captions on `lipkit data build "
                "canvases`), or set the objective's concepts_column."
            )
        table.found = table.share_spelled(seen, captions, tokenizer)
        if not table.found:
            raise UserError(
                f"No concept in the column '{column}' of {where} occurs in its row's captions; a concept must be a "
                "phrase of the caption (its features are pooled from the caption's tokens)."
            )
        return table

    def share_spelled(
        self, seen: dict[str, list[str]], captions: dict[str, list[str]], tokenizer: Any
    ) -> float:
        """The share of concepts spelled by at least one caption of their row."""
        keys = [k for k, c in seen.items() if c]
        found = 0
        for s in range(0, len(keys), 4096):  # a block of rows at a time: token ids of a whole table are large
            block = keys[s : s + 4096]
            flat = [c for k in block for c in captions[k]]
            rows, at = (tokenizer(flat).tolist() if flat else []), 0
            for key, sid in zip(block, sample_ids(block).tolist(), strict=True):
                mine = rows[at : at + len(captions[key])]
                at += len(captions[key])
                found += sum(any(find_span(row, span) >= 0 for row in mine) for span in self.spans[sid])
        return found / max(1, self.concepts)

    def pooling(self, ids: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ids (B,) and their captions' token ids (B, L) → (B, K, L) pooling weights (1/|span| on the
        tokens spelling each concept, 0 elsewhere) and (B, K) validity (the caption spells the concept)."""
        b, length = captions.shape
        weights = torch.zeros(b, self.width, length)
        rows = captions.tolist()
        for i, sid in enumerate(ids.tolist()):
            for j, span in enumerate(self.spans.get(sid, ())):
                at = find_span(rows[i], span)
                if at >= 0:
                    weights[i, j, at : at + len(span)] = 1.0 / len(span)
        return weights.to(captions.device), (weights > 0).any(-1).to(captions.device)
