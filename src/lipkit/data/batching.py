"""What every training batch source shares: the batch type, decoding a record, choosing a sample's
captions deterministically, counting skipped samples, and the data lines of metrics.jsonl.

Unusable samples are skipped and counted by reason (`lipkit.data.records.REASONS`); the first of each
reason is printed, every change is logged as a `{"kind": "data", ...}` line, and an epoch that skips
more than `max_skip_fraction` of its samples stops with a `UserError`.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import rich
import torch

from lipkit.data.frames import try_load_frames
from lipkit.data.images import try_load_image
from lipkit.data.records import REASONS, Record, describe
from lipkit.data.sentences import sentence_pool
from lipkit.data.text_augment import augment_caption
from lipkit.errors import UserError

# uint8 images (B, 3, H, W) or clips (B, T, 3, H, W), captions (B·k), keys (B)
Batch = tuple[torch.Tensor, list[str], list[str]]
Log = Callable[[dict[str, Any]], None]


def decode_record(record: Record, size: int, style: str = "lipkit") -> tuple[torch.Tensor | None, str, str]:
    """uint8 (3, S, S) — or (T, 3, S, S) for a record with frames (data/frames.py) — or None and why."""
    if record.frames is not None:
        return try_load_frames(record.frames, record.key, size, style)
    return try_load_image(record.source, size, style=style)


def choose_captions(
    captions: Sequence[str],
    key: str,
    seed: int,
    epoch: int,
    policy: str,
    k: int,
    text_augment: Mapping[str, float] | None = None,
    split_sentences: bool = False,
) -> list[str]:
    """`k` captions of a sample: the first ones, or a choice without replacement seeded by (seed, epoch,
    key) (cycling when the sample has fewer than k) — out of the sentences of its captions with
    `split_sentences` (data/sentences.py); each then edited by `data.text_augment` (data/text_augment.py),
    seeded by (seed, epoch, key, position)."""
    if split_sentences:
        captions = sentence_pool(captions)
    if policy == "first" or len(captions) == 1:
        chosen = [captions[i % len(captions)] for i in range(k)]
    else:
        row = zlib.crc32(key.encode("utf-8", "surrogatepass"))
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + row)
        order = torch.randperm(len(captions), generator=g).tolist()
        chosen = [captions[order[i % len(captions)]] for i in range(k)]
    if not text_augment:
        return chosen
    return [augment_caption(c, text_augment, seed, epoch, key, i) for i, c in enumerate(chosen)]


# -- counting what is skipped --------------------------------------------------------------------


class SkipCounter:
    """Skipped samples by reason, this epoch and in total; stops the run past `fraction` of an epoch."""

    def __init__(self, fraction: float, epoch_size: int, what: str) -> None:
        self.fraction, self.epoch_size, self.what = fraction, epoch_size, what
        self.current = 0
        self.epoch: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.seen = 0  # samples looked at this epoch (used + skipped)
        self.warned: set[str] = set()
        self.examples: dict[str, list[str]] = {}

    def start_epoch(self, epoch: int, counts: dict[str, int] | None = None, seen: int = 0) -> None:
        self.current, self.epoch, self.seen = epoch, Counter(counts or {}), seen

    def add(self, reason: str, key: str, detail: str = "", n: int = 1, quiet: bool = False) -> None:
        self.epoch[reason] += n
        self.total[reason] += n
        self.seen += n
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(key)
        if reason not in self.warned and not quiet:
            self.warned.add(reason)
            rich.get_console().print(
                f"[yellow]data:[/] skipping {key!r}: {REASONS.get(reason, reason)}"
                f"{f' ({detail})' if detail else ''}; further {reason} samples are counted in metrics.jsonl",
                highlight=False,
                markup=True,
            )
        self.check()

    def check(self) -> None:
        bad = sum(self.epoch.values())
        if bad > self.fraction * self.epoch_size:
            raise UserError(
                f"Skipped {bad} of {self.epoch_size} samples of {self.what} in epoch {self.current} "
                f"({describe(self.epoch)}), more than data.max_skip_fraction={self.fraction}; list them with "
                "`lipkit data validate`, then fix or remove them, or raise data.max_skip_fraction."
            )


def data_line(state: dict[str, Any], step: int) -> dict[str, Any]:
    return {
        "kind": "data",
        "step": step,
        "epoch": state["epoch"],
        "seen": state["seen"],
        "skipped": state["skipped"],
        "skipped_total": state["skipped_total"],
    }


def jsonl_log(path: Any) -> Log:
    """A `log` callback that appends one JSON line per record to `path` (e.g. a run's metrics.jsonl)."""

    def log(record: dict[str, Any]) -> None:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    return log


def skip_summary(skipped: Counter[str] | dict[str, int]) -> str:
    """One line for the end of a run: what was skipped, by reason."""
    total = sum(skipped.values())
    return (
        f"data: skipped {total} samples ({describe(skipped)}); `lipkit data validate` lists them"
        if total
        else ""
    )
