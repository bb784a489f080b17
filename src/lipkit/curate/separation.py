"""How well a score separates true image–caption pairs from mispaired ones, on a collection whose noise
is known (`lipkit data build noisy` keeps it in truth.jsonl): the area under the ROC curve, computed by
Mann–Whitney's rank formula (no threshold is chosen), and the reading of a truth file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lipkit.errors import UserError


def auc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of `scores` at ranking positive rows above the others: the chance that a
    random positive outscores a random negative, ties counting half. Mann–Whitney's rank formula,
    (R₊ − n₊(n₊+1)/2) / (n₊ n₋), R₊ the sum of the positives' ranks (tied values share their mean rank)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(
            "The AUC needs both kinds of pairs (true and mispaired); the --truth file marks only one kind."
        )
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(s))
    ranks[order] = ((ends - counts + 1 + ends) / 2)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def read_truth(path: str | Path) -> dict[str, bool]:
    """key → mispaired, from a JSONL file of {"key", "mispaired": bool} lines (`lipkit data build noisy`
    writes one as truth.jsonl beside its table)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"Truth file '{p}' does not exist; pass the truth.jsonl of `lipkit data build noisy`."
        )
    out: dict[str, bool] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, value = str(row["key"]), row["mispaired"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f'Line {n} of \'{p}\' is not a {{"key", "mispaired"}} object ({e}); fix it.'
            ) from e
        if not isinstance(value, bool):
            raise UserError(f"Line {n} of '{p}' has mispaired={value!r}; it must be true or false.")
        out[key] = value
    return out
