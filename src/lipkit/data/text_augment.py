"""Seeded text augmentation of training captions (`data.text_augment`), the text side of the recipe in
"Improved Baselines for Vision-Language Pre-training" (Fini et al., 2023), which uses EDA's word-level
edits (Wei & Zou, 2019).

For each chosen caption (sample key k, its position c among the sample's captions, epoch e, run seed s),
a generator seeded by (s, e, k, c) applies, to the caption's whitespace-separated words, in this order:

    drop p_d:  each word is deleted with probability p_d (a caption keeps at least one word)
    swap p_s:  max(1, round(p_s · n)) times, two positions drawn uniformly are exchanged (EDA's random swap)
    mask p_m:  each word becomes "[MASK]" with probability p_m (at least one word stays unmasked)

The result depends only on (seed, epoch, key, position), so it is the same on any rank and after any
resume. "[MASK]" is the mask token of BERT-style tokenizers (the pretrained MiniLM text tower's reads it
as its mask token); lipkit's own BPE reads it as ordinary text. Not implemented of EDA: synonym replacement
and random insertion, which need a thesaurus (WordNet) that is not available offline.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from lipkit.errors import UserError

OPERATIONS = ("drop", "swap", "mask")
MASK = "[MASK]"


def check_text_augment(probabilities: Mapping[str, float]) -> None:
    """Refuse unknown operations and probabilities outside [0, 1] (one sentence naming the fix)."""
    for name, p in probabilities.items():
        if name not in OPERATIONS:
            raise UserError(f"data.text_augment has no operation '{name}'; use {', '.join(OPERATIONS)}.")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise UserError(f"data.text_augment.{name} is {p!r}; give a probability between 0 and 1.")


def augment_caption(
    text: str, probabilities: Mapping[str, float], seed: int, epoch: int, key: str, index: int
) -> str:
    """`text` with the word edits of `probabilities` applied, drawn from a generator seeded by the rest."""
    if not any(probabilities.get(op, 0) for op in OPERATIONS):
        return text
    words = text.split()
    if not words:
        return text
    rng = random.Random(f"text-augment/{seed}/{epoch}/{key}/{index}")
    drop, swap, mask = (float(probabilities.get(op, 0)) for op in OPERATIONS)
    if drop:
        kept = [w for w in words if rng.random() >= drop]
        words = kept or [words[rng.randrange(len(words))]]
    if swap and len(words) > 1:
        for _ in range(max(1, round(swap * len(words)))):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    if mask:
        masked = [rng.random() < mask for _ in words]
        if all(masked):
            masked[rng.randrange(len(words))] = False
        words = [MASK if m else w for w, m in zip(words, masked, strict=True)]
    return " ".join(words)
