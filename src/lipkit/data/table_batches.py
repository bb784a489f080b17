"""Map-style sources (tables, parquet, folders, saved HF datasets; `TrainBatches`); their images come from
`data.image_store.ImageStore`.

Epoch e visits `randperm(N, seed + e)` in batches, and the captions of a sample are drawn from a
generator seeded with (seed, epoch, key). The data position is therefore just (epoch, batch index).
Small datasets are decoded once into one uint8 tensor (`data.cache_images`; unusable images are dropped
there, before training, and counted); large ones are decoded per batch in DataLoader worker processes.

Ranks: global batch t holds the rows at positions t·B … (t+1)·B − 1 of the epoch's order; rank r of W
reads, decodes and yields only its slots t·B + r·b … t·B + (r+1)·b − 1 (b = B / W), so the ranks'
batches, concatenated, are the batch one process reads. Decoding per batch, a slot whose image cannot be
used takes a substitute row drawn from a generator seeded by (seed, epoch, slot, attempt): which row
replaces it depends on the slot alone, never on another rank's skips or on the rank count, so no rank
needs to know what another skipped and every batch is full. Skips are counted per rank (each against
its share of `max_skip_fraction`) and summed into the checkpoint (`merge_states`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lipkit.data.batching import Batch, Log, SkipCounter, choose_captions, data_line
from lipkit.data.caption_mix import check_mix, check_mix_columns, mixed_captions, sources
from lipkit.data.captions import (
    add_meta_captions_checked,
    captioned_records,
    check_meta_templates,
    filter_captions,
)
from lipkit.data.change_phrases import add_change_phrases
from lipkit.data.frames import with_frame_count
from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record, Skip, collect, describe
from lipkit.data.text_augment import check_text_augment
from lipkit.errors import UserError

# -- map-style sources ---------------------------------------------------------------------------


SUBSTITUTES = 64  # tries per slot to find a usable row in its place before giving up


class TrainBatches:
    """Deterministic, resumable epochs of (uint8 images, captions, keys) batches from records; the last
    partial batch is dropped. `read_skipped`: rows the source reader could not use (counted against
    `max_skip_fraction` with the images that do not decode). `rank` of `world`: this rank's share of
    every global batch of `batch_size` (see the module docstring)."""

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
        rank: int = 0,
        world: int = 1,
        caption_mix: dict[str, float] | None = None,  # data.caption_mix (data/caption_mix.py)
        text_augment: dict[str, float] | None = None,  # data.text_augment (data/text_augment.py)
        split_sentences: bool = False,  # data.split_sentences (data/sentences.py)
        caption_column: str = "captions",
    ) -> None:
        if batch_size % world:
            raise UserError(f"train.batch_size={batch_size} is not divisible by the {world} ranks.")
        check_mix(caption_mix or {})
        check_text_augment(text_augment or {})
        self.mix, self.caption_column = dict(caption_mix or {}), caption_column
        self.text_augment, self.split_sentences = dict(text_augment or {}), split_sentences
        self.rank, self.world, self.local = rank, world, batch_size // world
        self.batch_size, self.seed, self.policy = batch_size, seed, caption_policy
        self.per_image, self.log = captions_per_image, log
        self.records = list(records)
        self.read_skipped = Counter(read_skipped or {})
        rows = len(self.records) + sum(self.read_skipped.values())
        self.skips = SkipCounter(max_skip_fraction, rows, "the training data")  # rows: every rank drops them
        self.store = ImageStore(self.records, size, cache, workers, desc="training")  # drops bad rows
        self.dropped = self.read_skipped + self.store.skipped  # before training, every epoch
        if rank == 0:  # every rank dropped them; rank 0 counts them
            self.skips.total.update(self.dropped)
        self.skips.start_epoch(0, self.dropped)
        self.skips.check()
        # each rank checks its share of the rows; rank 0 also carries the rows dropped before training
        dropped = sum(self.dropped.values())
        self.skips.epoch_size = (rows - dropped) // world + (dropped if rank == 0 else 0)
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
        """`captions_per_image` captions of a row (see `choose_captions`), from the source `caption_mix`
        draws when it is set (data/caption_mix.py)."""
        r = self.records[row]
        caps = r.captions
        if self.mix:
            caps = mixed_captions(caps, r.meta, r.key, self.seed, epoch, self.caption_column, self.mix)
        return choose_captions(
            caps,
            r.key,
            self.seed,
            epoch,
            self.policy,
            self.per_image,
            self.text_augment,
            self.split_sentences,
        )

    def state(self) -> dict[str, Any]:
        """This rank's position and skip counts (`merge_states` makes one of all ranks')."""
        return dict(self._state)

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """The ranks' states as one: the common position, the skip counts summed, and each rank's own."""
        if not states or not states[0]:
            return {}
        total: dict[str, Counter[str]] = {k: Counter() for k in ("skipped", "skipped_total")}
        for st in states:
            for k, counter in total.items():
                counter.update(st[k])
        merged = {k: v for k, v in states[0].items() if k not in ("rank", "world")}
        merged.update({k: dict(v) for k, v in total.items()}, seen=sum(st["seen"] for st in states))
        return {**merged, "ranks": states} if len(states) > 1 else merged

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Resume from `state` (one rank's or merged): this rank's own counts when the rank count is the
        same, else the summed counts on rank 0 (the position is the same for every rank count)."""
        if not state or state.get("kind") != "records":
            return
        ranks = state.get("ranks", [state])
        if len(ranks) == self.world:
            state = ranks[self.rank]
        else:  # another rank count: rank 0 carries the totals; this epoch's skips count afresh
            totals = state.get("skipped_total", {}) if self.rank == 0 else {}
            state = {**state, "seen": 0, "skipped": {}, "skipped_total": totals}
        self._resume = state
        self.skips.total = Counter(state.get("skipped_total", {}))

    def _substitute(self, epoch: int, slot: int, attempt: int, batch: set[int]) -> int:
        """The row tried in place of slot `slot`'s at `attempt` (1, 2, ...): the same on every rank, and
        not one of the global batch's own rows `batch` (a duplicate would be its own negative)."""
        rng = random.Random(f"{self.seed}/{epoch}/{slot}/{attempt}")
        row = rng.randrange(len(self.records))
        while row in batch and len(batch) < len(self.records):
            row = rng.randrange(len(self.records))
        return row

    def _decode_slots(self, epoch: int, slots: range, order: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The images of `slots` of the epoch's order, each unusable one replaced (`_substitute`); returns
        the images and the rows they are, in slot order."""
        rows = [order[s] for s in slots]
        first = slots.start - slots.start % self.batch_size
        batch = set(order[first : first + self.batch_size])  # the global batch's rows: known to every rank
        images: list[torch.Tensor | None] = [None] * len(rows)
        tries = [0] * len(rows)  # per slot: its substitutes depend on the slot alone
        todo, bad = list(range(len(rows))), set()
        while todo:
            decoded, kept, skips = self.store.decode([rows[j] for j in todo])
            for s in skips:
                self.skips.add(s.reason, s.key, s.detail)
            self.skips.seen += len(kept)
            it = iter(zip(kept, decoded, strict=True))
            nxt = next(it, None)
            missing = []
            for j in todo:  # `kept` is the decodable part of the rows asked for, in order
                if nxt is not None and nxt[0] == rows[j]:
                    images[j], nxt = nxt[1], next(it, None)
                else:
                    missing.append(j)
            bad.update(rows[j] for j in missing)
            for j in missing:  # a row known to be unusable is not tried (nor counted) twice
                while rows[j] in bad:
                    tries[j] += 1
                    if tries[j] > SUBSTITUTES:
                        raise UserError(
                            f"No usable training image found in {SUBSTITUTES} tries "
                            f"({describe(self.skips.epoch)}); check the data with `lipkit data validate`."
                        )
                    rows[j] = self._substitute(epoch, slots[j], tries[j], batch)
            todo = missing
        return torch.stack([x for x in images if x is not None]), rows

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's share of the batches of `epoch` from batch `start_batch` on: (uint8 images (b, 3,
        H, W), captions (b·k, image-major: the k captions of image 0, then of image 1 ...), keys (b)).
        Every position is exact to resume at: the order, and any substitute rows, follow from the seed."""
        resume, self._resume = self._resume, None
        if resume is not None and (resume["epoch"], resume["batch"]) == (epoch, start_batch):
            self.skips.start_epoch(epoch, resume["skipped"], resume["seen"])
        else:
            dropped = self.dropped if self.rank == 0 else Counter()  # every rank dropped them: count once
            self.skips.start_epoch(epoch, dropped, sum(dropped.values()))
            if self.dropped and self.log and (epoch, start_batch) == (0, 0):
                self.log({"kind": "data", "step": 0, "epoch": 0, "skipped": dict(self.dropped)})
        order = self.order(epoch).tolist()
        bs, first = self.batch_size, self.rank * self.local
        for b in range(start_batch, len(self)):
            logged = sum(self.skips.epoch.values())
            slots = range(b * bs + first, b * bs + first + self.local)
            if self.store.cache is not None:
                idx = [order[s] for s in slots]
                images = self.store.get(idx)
                self.skips.seen += len(idx)
            else:
                images, idx = self._decode_slots(epoch, slots, order)
            self._state = {
                "kind": "records",
                "epoch": epoch,
                "batch": b + 1,
                "seen": self.skips.seen,
                "skipped": dict(self.skips.epoch),
                "skipped_total": dict(self.skips.total),
                "rank": self.rank,
                "world": self.world,
            }
            if self.log and sum(self.skips.epoch.values()) != logged:
                self.log(data_line(self._state, epoch * len(self) + b + 1))
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
        """Every training caption, of every source of data.caption_mix (for a tokenizer)."""
        mix, column = self.cfg.caption_mix if self.cfg else {}, self.cfg.caption_column if self.cfg else ""
        for r in self.records:  # its own captions always (a row without any mix source trains on them)
            yield from r.captions
            if mix:
                yield from (c for name, caps in sources([], r.meta, column, mix).items() for c in caps)

    def batches(
        self, size: int, batch_size: int, seed: int, log: Log | None = None, rank: int = 0, world: int = 1
    ) -> TrainBatches:
        """This rank's share of every batch (`rank` of `world`)."""
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
            rank=rank,
            world=world,
            caption_mix=d.caption_mix,
            caption_column=d.caption_column,
            text_augment=d.text_augment,
            split_sentences=d.split_sentences,
        )


def open_records(d: Any, scan: Callable[..., Iterator[Record | Skip]]) -> RecordSource:
    """Read `d.train` (a DataConfig's source) with `scan`; caption languages, selection and meta captions
    applied."""
    records, skipped = collect(scan(d.train, d.image_column, d.caption_column, d.image_root))
    with_frame_count(records, d.num_frames, d.frame_sampling)  # clips: data.num_frames each
    if d.caption_langs or d.caption_select or d.meta_captions:
        check_meta_templates(d.meta_captions)
        records = filter_captions(records, d.caption_select, d.caption_langs)
        records = add_meta_captions_checked(records, d.meta_captions, d.train)
    if d.caption_mix:
        check_mix_columns([r.meta for r in records], d.caption_mix, d.caption_column, str(d.train))
    if d.change_phrases:  # VDI: each row's change phrase second (its first caption when none is found)
        add_change_phrases(records, str(d.train))
    captioned = captioned_records(records, d.train)
    skipped["no_caption"] += len(records) - len(captioned)
    return RecordSource(captioned, skipped, d)
