"""`data.caption_mix`: captions from several sources, kept apart in the table, sampled with set
probabilities.

Rows may carry captions of different origins in different columns: the raw alt-text in
`data.caption_column`, captions a model generated, captions `lipkit data associate` retrieved
(`captions_retrieved`), captions made from labels. `data.caption_mix: {captions: 0.7, captions_retrieved:
0.3}` draws, for every sample in every epoch, one source with those probabilities — among the sources the
row has (an empty or missing column does not compete; the others' weights are renormalised) — then the
captions within it as `data.caption_policy` says. The draw is seeded by (train.seed, epoch, sample key)
alone: the same on any number of ranks and workers, and exactly the same after a resume.

As in "Revisit Large-Scale Image-Caption Data in Pre-training Multimodal Foundation Models" (Lai et al.,
2024), which trains on a tuned mix of alt-text and synthetic captions. Not implemented: generating the
synthetic captions (bring them as a column), and mixing at a finer grain than one source per sample.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from lipkit.data.records import parse_captions
from lipkit.errors import UserError


def check_mix(mix: Mapping[str, float]) -> None:
    """A caption mix must weigh each source ≥ 0 and some source > 0."""
    if any(not isinstance(w, int | float) or w < 0 for w in mix.values()) or (mix and sum(mix.values()) <= 0):
        raise UserError(
            f"data.caption_mix {dict(mix)} must give each caption column a weight >= 0, and some column a "
            "weight > 0, e.g. {captions: 0.7, captions_retrieved: 0.3}."
        )


def sources(
    captions: Sequence[str], meta: Mapping[str, Any], caption_column: str, mix: Mapping[str, float]
) -> dict[str, list[str]]:
    """The row's non-empty caption sources among those `mix` names (its `caption_column` captions are
    `captions`, already selected and filtered; the other columns are read from the metadata)."""
    out: dict[str, list[str]] = {}
    for name in mix:
        caps = list(captions) if name == caption_column else (parse_captions(meta.get(name)) or [])
        if caps and mix[name] > 0:
            out[name] = caps
    return out


def pick_source(
    available: Mapping[str, list[str]], mix: Mapping[str, float], key: str, seed: int, epoch: int
) -> str:
    """One source of `available`, with probability proportional to its weight, from a generator seeded by
    (seed, epoch, key) (a string seed: Python hashes it with SHA-512, the same in every process)."""
    names = list(available)
    u = random.Random(f"caption_mix/{seed}/{epoch}/{key}").random() * sum(mix[n] for n in names)
    for name in names:
        u -= mix[name]
        if u < 0:
            return name
    return names[-1]


def check_mix_columns(
    metas: Sequence[Mapping[str, Any]], mix: Mapping[str, float], caption_column: str, source: str
) -> None:
    """Refuse a mix column that no row has (a typo would otherwise never be drawn, silently)."""
    missing = [n for n in mix if n != caption_column and not any(n in m for m in metas)]
    if missing:
        have = sorted({k for m in metas[:1000] for k in m})
        raise UserError(
            f"No row of '{source}' has the data.caption_mix column(s) {', '.join(repr(n) for n in missing)}; "
            f"use the caption column '{caption_column}' or one of: {', '.join(have) or 'none'}."
        )


def mixed_captions(
    captions: Sequence[str],
    meta: Mapping[str, Any],
    key: str,
    seed: int,
    epoch: int,
    caption_column: str,
    mix: Mapping[str, float],
) -> list[str]:
    """The captions of the source drawn for this sample this epoch (its own captions when no source of
    the mix has any)."""
    available = sources(captions, meta, caption_column, mix)
    if not available:
        return list(captions)
    return available[pick_source(available, mix, key, seed, epoch)]
