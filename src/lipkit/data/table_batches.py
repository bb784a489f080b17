"""Map-style sources (tables, parquet, folders; `TrainBatches`) and the decoded-image store (`ImageStore`).

Epoch e visits `randperm(N, seed + e)` in batches, and the captions of a sample are drawn from a
generator seeded with (seed, epoch, key). The data position is therefore just (epoch, batch index).
Small datasets are decoded once into one uint8 tensor (`data.cache_images`; unusable images are dropped
there, before training, and counted); large ones are decoded per batch in DataLoader worker processes
(a batch loses its unusable images, counted).
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rich
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from lipkit.data.batching import Batch, Log, SkipCounter, choose_captions, data_line, decode_record
from lipkit.data.captions import add_meta_captions_checked, check_meta_templates, filter_captions
from lipkit.data.records import REASONS, Record, Skip, collect, describe
from lipkit.errors import UserError

# -- map-style sources ---------------------------------------------------------------------------


class _Images(Dataset):
    def __init__(self, records: Sequence[Record], size: int) -> None:
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str, str]:
        x, reason, detail = decode_record(self.records[i], self.size)
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


class ImageStore:
    """uint8 images by index: decoded once into memory, or read from disk in worker processes.

    With `cache`, unusable images are counted in `skipped` (by reason; `problems` names them) and their
    records are removed from `records` in place, so that a caller's list stays aligned with the images."""

    def __init__(
        self, records: Sequence[Record], size: int, cache: bool, workers: int = 0, desc: str = ""
    ) -> None:
        self.records, self.size, self.workers = records, size, workers
        self.cache: torch.Tensor | None = None
        self.skipped: Counter[str] = Counter()
        self.problems: list[Skip] = []
        if cache:
            self._fill(desc)

    def _fill(self, desc: str) -> None:
        records, size = self.records, self.size
        cache = torch.empty(len(records), 3, size, size, dtype=torch.uint8)
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
                    cache[len(keep)] = x
                    keep.append(i)
                bar.advance(task)
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
        ds = torch.utils.data.Subset(_Images(self.records, self.size), list(indices))
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


class TrainBatches:
    """Deterministic, resumable epochs of (uint8 images, captions, keys) batches from records; the last
    partial batch is dropped. `read_skipped`: rows the source reader could not use (counted against
    `max_skip_fraction` with the images that do not decode)."""

    def __init__(
        self,
        records: Sequence[Record],
        size: int,
        batch_size: int,
        seed: int,
        caption_policy: str = "random",
        captions_per_image: int = 1,
        cache: bool = True,
        workers: int = 0,
        *,
        max_skip_fraction: float = 0.01,
        read_skipped: dict[str, int] | None = None,
        log: Log | None = None,
    ) -> None:
        self.batch_size, self.seed, self.policy = batch_size, seed, caption_policy
        self.per_image, self.log = captions_per_image, log
        self.records = list(records)
        self.read_skipped = Counter(read_skipped or {})
        rows = len(self.records) + sum(self.read_skipped.values())
        self.skips = SkipCounter(max_skip_fraction, rows, "the training data")
        self.store = ImageStore(self.records, size, cache, workers, desc="training")  # drops bad rows
        self.dropped = self.read_skipped + self.store.skipped  # before training, every epoch
        self.skips.total.update(self.dropped)
        self.skips.start_epoch(0, self.dropped)
        self.skips.check()
        if len(self.records) < batch_size:
            raise UserError(
                f"The training table has {len(self.records)} usable rows, fewer than train.batch_size="
                f"{batch_size}; lower the batch size or add data."
            )
        self._resume: dict[str, Any] | None = None
        self._state: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> Counter[str]:
        return self.skips.total

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(
            len(self.records), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        )

    def captions(self, row: int, epoch: int) -> list[str]:
        """`captions_per_image` captions of a row (see `choose_captions`)."""
        r = self.records[row]
        return choose_captions(r.captions, r.key, self.seed, epoch, self.policy, self.per_image)

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state and state.get("kind") == "records":
            self._resume = state
            self.skips.total = Counter(state.get("skipped_total", {}))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from batch `start_batch` on: (uint8 images (B, 3, H, W), captions (B·k,
        image-major: the k captions of image 0, then of image 1 ...), keys (B)).

        Decoding per batch (no cache), a batch takes the next usable rows of the epoch's order, so every
        batch is full; the position in the order is part of the saved state (without it, resuming
        replays the epoch's earlier batches: exact, only slower)."""
        resume, self._resume = self._resume, None
        matched = resume is not None and (resume["epoch"], resume["batch"]) == (epoch, start_batch)
        if matched and resume is not None:
            self.skips.start_epoch(epoch, resume["skipped"], resume["seen"])
            p, pass_, replay = resume.get("position", 0), resume.get("pass", 0), 0
        else:
            self.skips.start_epoch(epoch, self.dropped, sum(self.dropped.values()))
            p, pass_, replay = 0, 0, start_batch if self.store.cache is None else 0
            if self.dropped and self.log and (epoch, start_batch) == (0, 0):
                self.log({"kind": "data", "step": 0, "epoch": 0, "skipped": dict(self.dropped)})
        order = self.order(epoch).tolist()
        n, bs = len(self.records), self.batch_size
        b = start_batch - replay
        good_this_pass = 0
        while b < len(self):
            logged = sum(self.skips.epoch.values())
            if self.store.cache is not None:
                idx = order[b * bs : (b + 1) * bs]
                images = self.store.get(idx)
                self.skips.seen += bs
            else:
                idx, parts = [], []
                while len(idx) < bs:
                    if p >= n:
                        if not good_this_pass:
                            raise UserError(
                                f"No training image can be decoded ({describe(self.skips.epoch)}); "
                                "check the data with `lipkit data validate`."
                            )
                        p, pass_, good_this_pass = 0, pass_ + 1, 0
                    want = order[p : min(n, p + bs - len(idx))]
                    imgs, kept, skips = self.store.decode(want)
                    p += len(want)
                    for s in skips:
                        self.skips.add(s.reason, s.key, s.detail, quiet=b < replay)
                    self.skips.seen += len(kept)
                    good_this_pass += len(kept)
                    idx += kept
                    parts.append(imgs)
                images = torch.cat(parts)
            b += 1
            self._state = {
                "kind": "records",
                "epoch": epoch,
                "batch": b,
                "position": p,
                "pass": pass_,
                "seen": self.skips.seen,
                "skipped": dict(self.skips.epoch),
                "skipped_total": dict(self.skips.total),
            }
            if b <= replay:
                continue
            if self.log and sum(self.skips.epoch.values()) != logged:
                self.log(data_line(self._state, epoch * len(self) + b))
            keys = [self.records[i].key for i in idx]
            yield images, [c for i in idx for c in self.captions(i, epoch)], keys


# -- opening a source of records for training ----------------------------------------------------


@dataclass
class RecordSource:
    """A map-style training source, read into memory (images not decoded): tables, parquet, folders."""

    records: list[Record]
    read_skipped: Counter[str] = field(default_factory=Counter)
    cfg: Any = None

    def captions(self) -> Iterator[str]:
        """Every training caption (for a tokenizer)."""
        return (c for r in self.records for c in r.captions)

    def batches(self, size: int, batch_size: int, seed: int, log: Log | None = None) -> TrainBatches:
        d = self.cfg
        return TrainBatches(
            self.records,
            size,
            batch_size,
            seed,
            d.caption_policy,
            d.captions_per_image,
            d.cache_images,
            d.workers,
            max_skip_fraction=d.max_skip_fraction,
            read_skipped=self.read_skipped,
            log=log,
        )


def open_records(d: Any, scan: Callable[..., Iterator[Record | Skip]]) -> RecordSource:
    """Read `d.train` (a DataConfig's source) with `scan`; caption languages, selection and meta captions
    applied."""
    records, skipped = collect(scan(d.train, d.image_column, d.caption_column, d.image_root))
    if d.caption_langs or d.caption_select or d.meta_captions:
        check_meta_templates(d.meta_captions)
        records = filter_captions(records, d.caption_select, d.caption_langs)
        records = add_meta_captions_checked(records, d.meta_captions, d.train)
    return RecordSource(records, skipped, d)
