"""The few-shot protocol of the prompt-learning papers (CoOp, Zhou et al., 2022; CoCoOp; GRAM): K labelled
images per class drawn from the training table with a seed, and the base/novel split of the classes.

Shots: the classes are a metadata column's values; for each class in sorted order, its records are shuffled
by `random.Random(f"{seed}:{class}")` and the first K kept (all of them when it has fewer), so a class's shots
do not depend on which other classes exist, and K shots are a prefix of K' > K shots for the same seed.
Base/novel: the sorted classes, the first ⌈C/2⌉ base and the rest novel (CoOp's split, by name order).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

from lipkit.data.records import Record
from lipkit.errors import UserError

SPLITS = ("all", "base", "novel")


def class_split(classes: Sequence[str], split: str) -> list[str]:
    """The sorted classes of `split`: all of them, the first ⌈C/2⌉ (base) or the rest (novel)."""
    if split not in SPLITS:
        raise UserError(f"The class split must be one of {', '.join(SPLITS)}, not '{split}'.")
    ordered = sorted(set(classes))
    half = math.ceil(len(ordered) / 2)
    return {"all": ordered, "base": ordered[:half], "novel": ordered[half:]}[split]


def few_shot(
    records: Sequence[Record], column: str, shots: int, seed: int, classes: Sequence[str] | None = None
) -> tuple[list[Record], list[str]]:
    """(K records per class, image-major by class, and their labels) for the classes `classes` (default:
    every value of `column` in `records`)."""
    if shots < 1:
        raise UserError(f"The number of shots per class must be 1 or more, not {shots}.")
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        value = r.meta.get(column)
        if value not in (None, ""):
            by_class[str(value)].append(r)
    if not by_class:
        raise UserError(
            f"No record of the table has a value in column '{column}'; pass a class column it has."
        )
    wanted = sorted(by_class) if classes is None else list(classes)
    chosen, labels = [], []
    for name in wanted:
        pool = sorted(by_class.get(name, []), key=lambda r: r.key)
        random.Random(f"{seed}:{name}").shuffle(pool)
        chosen += pool[:shots]
        labels += [name] * len(pool[:shots])
    return chosen, labels
