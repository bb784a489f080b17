"""The decoded-image store (`ImageStore`: images by index, decoded once into memory or per batch in
DataLoader worker processes) and the DataLoader that decodes them (`worker_loader`): what training on
records (data/table_batches.py), evaluation and the data tools read images through."""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import rich
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from lipkit.data.batching import decode_record
from lipkit.data.records import REASONS, Record, Skip, describe
from lipkit.errors import UserError


class _Images(Dataset):
    def __init__(self, records: Sequence[Record], size: int, style: str = "lipkit") -> None:
        self.records, self.size, self.style = records, size, style

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str, str]:
        x, reason, detail = decode_record(self.records[i], self.size, self.style)
        return i, (x if x is not None else torch.empty(0, dtype=torch.uint8)), reason, detail


def _worker_init(worker_id: int) -> None:
    # A forked worker inherits the trainer's SIGINT/SIGTERM handlers: the main process alone decides
    # when to stop (Ctrl-C reaches the whole process group; torch ends a worker quietly on it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # DataLoader's per-worker seed, derived from our generator
    random.seed(seed)
    np.random.seed(seed)


def worker_loader(dataset: Any, workers: int, seed: int, **kw: Any) -> DataLoader:
    """A DataLoader that leaves the global RNG alone (it seeds its workers from its own generator)."""
    extra = {"prefetch_factor": 4, "worker_init_fn": _worker_init} if workers else {}
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        **extra,
        **kw,
    )


def epoch_batches(n: int, steps: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`steps` batches of row indices into n rows: seeded permutations of all n, one after another (each
    row seen once per pass)."""
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-steps * batch_size // n))])
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def check_same_shape(first: torch.Tensor, x: torch.Tensor, key: str) -> None:
    """Refuse a source that mixes images and clips (a `frames` column on some rows only) in one sentence."""
    if x.shape != first.shape:
        what = {3: "an image", 4: "a clip"}
        raise UserError(
            f"Sample '{key}' is {what.get(x.dim(), 'a sample')} and an earlier one {what.get(first.dim(), 'not')}: "
            "a table holds images or clips (a `frames` column), not both; split it into two tables."
        )


class ImageStore:
    """uint8 images by index: decoded once into memory, or read from disk in worker processes.

    With `cache`, unusable images are counted in `skipped` (by reason; `problems` names them) and their
    records are removed from `records` in place, so that a caller's list stays aligned with the images."""

    def __init__(
        self,
        records: Sequence[Record],
        size: int,
        cache: bool,
        workers: int = 0,
        desc: str = "",
        style: str = "lipkit",  # data.images.load_image's decode style
    ) -> None:
        self.records, self.size, self.workers, self.style = records, size, workers, style
        self.cache: torch.Tensor | None = None
        self.skipped: Counter[str] = Counter()
        self.problems: list[Skip] = []
        if cache:
            self._fill(desc)

    def _fill(self, desc: str) -> None:
        records = self.records
        cache: torch.Tensor | None = None  # (N, 3, S, S), or (N, T, 3, S, S) for clips
        keep: list[int] = []
        with Progress(transient=True) as bar:
            task = bar.add_task(f"decoding {desc} images", total=len(records))
            for i, x, reason, detail in self._read(range(len(records))):
                if reason:
                    self.skipped[reason] += 1
                    self.problems.append(Skip(reason, records[i].key, detail))
                    bar.update(
                        task, description=f"decoding {desc} images ({sum(self.skipped.values())} skipped)"
                    )
                else:
                    if cache is None:
                        cache = torch.empty(len(records), *x.shape, dtype=torch.uint8)
                    check_same_shape(cache[0], x, records[i].key)
                    cache[len(keep)] = x
                    keep.append(i)
                bar.advance(task)
        if cache is None:
            cache = torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        self.cache = cache[: len(keep)] if len(keep) < len(records) else cache
        if self.problems:
            if not isinstance(records, list):
                first = self.problems[0]
                raise UserError(
                    f"Image '{first.key}' cannot be used ({REASONS[first.reason]}: {first.detail}); "
                    "replace or remove it."
                )
            records[:] = [records[i] for i in keep]
            first = self.problems[0]
            rich.get_console().print(
                f"[yellow]data:[/] skipped {len(self.problems)} unusable {desc + ' ' if desc else ''}images "
                f"({describe(self.skipped)}), e.g. {first.key!r} ({first.detail})",
                highlight=False,
            )

    def _read(self, indices: Sequence[int]) -> Iterator[tuple[int, torch.Tensor, str, str]]:
        ds = torch.utils.data.Subset(_Images(self.records, self.size, self.style), list(indices))
        for i, x, reason, detail in worker_loader(ds, self.workers, 0):
            yield int(i), x, reason, detail

    def decode(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[int], list[Skip]]:
        """Images of `indices` that decode, the indices they belong to, and a Skip for each that does not."""
        images, kept, skips = [], [], []
        for i, x, reason, detail in self._read([int(i) for i in indices]):
            if reason:
                skips.append(Skip(reason, self.records[i].key, detail))
            else:
                images.append(x)
                kept.append(i)
        for i, x in zip(kept[1:], images[1:], strict=True):
            check_same_shape(images[0], x, self.records[i].key)
        out = torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return out, kept, skips

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[torch.as_tensor(indices, dtype=torch.long)]
        images, _, skips = self.decode([int(i) for i in indices])
        if skips:
            s = skips[0]
            raise UserError(
                f"Image '{s.key}' cannot be used ({REASONS[s.reason]}: {s.detail}); replace or remove it."
            )
        return images
