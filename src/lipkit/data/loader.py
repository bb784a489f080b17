"""Batches for training and evaluation: deterministic epochs, exact resume, skip-and-count.

Map-style sources (tables, parquet, folders; `TrainBatches`): epoch e visits `randperm(N, seed + e)` in
batches, and the captions of a sample are drawn from a generator seeded with (seed, epoch, key). The
data position is therefore just (epoch, batch index). Small datasets are decoded once into one uint8
tensor (`data.cache_images`; unusable images are dropped there, before training, and counted); large
ones are decoded per batch in DataLoader worker processes (a batch loses its unusable images, counted).

WebDataset shards (`ShardBatches`) are streamed: epoch e permutes the shards with (seed, epoch), deals
them round-robin to W worker streams (W = data.workers, one in-process stream when 0), and each stream
reads its shards in turn through a shuffle buffer seeded by (seed, epoch, shard), decoding in the
worker. The main process merges the streams in a fixed order (round-robin over chunks of 16 samples
with fixed boundaries), so the sample order depends on the seed and W only, never on timing. The data
position after a batch is, per stream, (shard, samples consumed in it); resuming skips whole shards
unread and the consumed part of the current one undecoded, then continues with exactly the next batch.
An epoch is `samples_per_epoch // batch_size` batches (counted once from the shards, see
`lipkit.data.shards.shard_counts`, or `data.samples_per_epoch`); when skipped samples leave a pass
short, the epoch goes on with a second pass over the shards (order seeded by the pass too).

Unusable samples are skipped and counted by reason (`lipkit.data.sources.REASONS`); the first of each
reason is printed, every change is logged as a `{"kind": "data", ...}` line, and an epoch that skips
more than `max_skip_fraction` of its samples stops with a `UserError`.
"""

from __future__ import annotations

import random
import signal
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rich
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lipkit.data.shards import (
    ShardStatus,
    cached_counts,
    expand_shards,
    parse_sample,
    read_shard,
    shard_captions,
    shard_counts,
    shard_name,
)
from lipkit.data.sources import REASONS, Record, Skip, describe, read_records, source_kind
from lipkit.data.transforms import try_load_image
from lipkit.errors import UserError

Batch = tuple[torch.Tensor, list[str], list[str]]  # uint8 images (B, 3, H, W), captions (B·k), keys (B)
Log = Callable[[dict[str, Any]], None]
CHUNK = 16  # samples per chunk a worker stream hands over (fixed boundaries: part of the order)


def decode_record(record: Record, size: int) -> tuple[torch.Tensor | None, str, str]:
    return try_load_image(record.data if record.data is not None else record.image, size)


def choose_captions(
    captions: Sequence[str], key: str, seed: int, epoch: int, policy: str, k: int
) -> list[str]:
    """`k` captions of a sample: the first ones, or a choice without replacement seeded by (seed, epoch,
    key) (cycling when the sample has fewer than k)."""
    if policy == "first" or len(captions) == 1:
        return [captions[i % len(captions)] for i in range(k)]
    row = zlib.crc32(key.encode("utf-8", "surrogatepass"))
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + row)
    order = torch.randperm(len(captions), generator=g).tolist()
    return [captions[order[i % len(captions)]] for i in range(k)]


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


def _loader(dataset: Any, workers: int, seed: int, **kw: Any) -> DataLoader:
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
        for i, x, reason, detail in _loader(ds, self.workers, 0):
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
                self.log(_data_line(self._state, epoch * len(self) + b))
            keys = [self.records[i].key for i in idx]
            yield images, [c for i in idx for c in self.captions(i, epoch)], keys


def _data_line(state: dict[str, Any], step: int) -> dict[str, Any]:
    return {
        "kind": "data",
        "step": step,
        "epoch": state["epoch"],
        "seen": state["seen"],
        "skipped": state["skipped"],
        "skipped_total": state["skipped_total"],
    }


# -- WebDataset shards ---------------------------------------------------------------------------


def _shuffled(samples: Iterator[dict[str, Any]], rng: random.Random, size: int) -> Iterator[dict[str, Any]]:
    """A seeded shuffle buffer of `size` samples (exact order for a given seed); flushed at the end."""
    buf: list[dict[str, Any]] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(len(buf))
        buf[j], s = s, buf[j]
        yield s
    rng.shuffle(buf)
    yield from buf


@dataclass
class _StreamSpec:
    urls: list[str]  # this pass's shard order; stream w reads urls[w::streams]
    streams: int
    size: int
    seed: int
    epoch: int
    pass_: int
    buffer: int
    caption_column: str
    langs: list[str]
    select: list[int]
    counts: dict[str, int]
    start: dict[int, tuple[int, int]] = field(default_factory=dict)  # stream -> (shard, samples done)
    ended: set[int] = field(default_factory=set)


class _ShardStream(IterableDataset):
    """One worker's part of an epoch pass, as chunks (stream, items, images): an item is
    ("ok", shard, m, key, captions) with its image in `images`, ("skip", shard, m, reason, key, detail,
    lost), ("filtered", shard, m), ("fatal", message) or ("end",)."""

    def __init__(self, spec: _StreamSpec) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[tuple[int, list[tuple], torch.Tensor]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        spec = self.spec
        if w not in spec.ended:
            mine = spec.urls[w :: spec.streams]
            k0, m0 = spec.start.get(w, (0, 0))
            try:
                for k in range(k0, len(mine)):
                    yield from self._shard(w, k, mine[k], m0 if k == k0 else 0)
            except UserError as e:
                yield w, [("fatal", str(e))], self._empty()
                return
        yield w, [("end",)], self._empty()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, 3, self.spec.size, self.spec.size, dtype=torch.uint8)

    def _shard(self, w: int, k: int, url: str, skip: int) -> Iterator[tuple[int, list[tuple], torch.Tensor]]:
        spec = self.spec
        rng = random.Random(f"{spec.seed}/{spec.epoch}/{spec.pass_}/{shard_name(url)}")
        status = ShardStatus(url)
        items: list[tuple] = []
        images: list[torch.Tensor] = []
        group = None

        def add(
            m: int, item: tuple, image: torch.Tensor | None
        ) -> Iterator[tuple[int, list[tuple], torch.Tensor]]:
            nonlocal group, items, images
            if group is not None and m // CHUNK != group and items:
                yield w, items, torch.stack(images) if images else self._empty()
                items, images = [], []
            group = m // CHUNK
            items.append(item)
            if image is not None:
                images.append(image)

        for m, sample in enumerate(_shuffled(read_shard(url, status), rng, spec.buffer)):
            if m >= skip:
                yield from add(m, *self._item(k, m, sample))
        if status.reason and status.samples >= skip:
            s = status.skip(spec.counts.get(url))
            yield from add(
                status.samples, ("skip", k, status.samples, s.reason, s.key, s.detail, s.count), None
            )
        if items:
            yield w, items, torch.stack(images) if images else self._empty()

    def _item(self, k: int, m: int, sample: dict[str, Any]) -> tuple[tuple, torch.Tensor | None]:
        spec = self.spec
        parsed = parse_sample(sample, spec.caption_column)
        if isinstance(parsed, Skip):
            return ("skip", k, m, parsed.reason, parsed.key, parsed.detail, 1), None
        if spec.langs or spec.select:
            from lipkit.data.captions import filter_captions

            kept = filter_captions([parsed], spec.select, spec.langs)
            if not kept:
                return ("filtered", k, m), None
            parsed = kept[0]
        image, reason, detail = decode_record(parsed, spec.size)
        if image is None:
            return ("skip", k, m, reason, parsed.key, detail, 1), None
        return ("ok", k, m, parsed.key, parsed.captions), image


@dataclass
class _Position:
    epoch: int
    batch: int = 0  # batches of this epoch handed out
    pass_: int = 0
    start: dict[int, tuple[int, int]] = field(default_factory=dict)  # stream -> (shard, samples consumed)
    ended: set[int] = field(default_factory=set)
    turn: int = 0  # the stream whose chunk comes next


class ShardBatches:
    """Deterministic, exactly resumable epochs of (uint8 images, captions, keys) batches streamed from
    WebDataset shards (see the module docstring for the order and the position)."""

    def __init__(
        self,
        urls: Sequence[str],
        size: int,
        batch_size: int,
        seed: int,
        caption_policy: str = "random",
        captions_per_image: int = 1,
        workers: int = 0,
        *,
        samples_per_epoch: int = 0,
        shuffle_buffer: int = 1000,
        max_skip_fraction: float = 0.01,
        caption_column: str = "captions",
        langs: Sequence[str] = (),
        select: Sequence[int] = (),
        log: Log | None = None,
    ) -> None:
        self.urls = list(urls)
        self.select = list(select)
        self.size, self.batch_size, self.seed, self.policy = size, batch_size, seed, caption_policy
        self.per_image, self.log, self.buffer = captions_per_image, log, max(1, shuffle_buffer)
        self.caption_column, self.langs = caption_column, list(langs)
        self.counts = cached_counts(self.urls) if samples_per_epoch > 0 else shard_counts(self.urls)
        self.num_samples = samples_per_epoch if samples_per_epoch > 0 else sum(self.counts.values())
        if self.num_samples < batch_size:
            raise UserError(
                f"The training shards hold {self.num_samples} samples, fewer than train.batch_size="
                f"{batch_size}; lower the batch size, add data or set data.samples_per_epoch."
            )
        self.workers = min(max(0, workers), len(self.urls))
        self.streams = max(1, self.workers)
        self.skips = SkipCounter(max_skip_fraction, self.num_samples, "the training shards")
        self.filtered = 0
        self._resume: dict[str, Any] | None = None
        self._state: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    @property
    def skipped(self) -> Counter[str]:
        return self.skips.total

    def shard_order(self, epoch: int, pass_: int = 0) -> list[str]:
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + pass_)
        return [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state and state.get("kind") == "shards":
            self._resume = state
            self.skips.total = Counter(state.get("skipped_total", {}))

    def _start(self, epoch: int, start_batch: int) -> tuple[_Position, int]:
        """Where epoch `epoch` continues at batch `start_batch`: the saved position when it matches, else
        the epoch start and the number of batches to replay (exact, only slower)."""
        r, self._resume = self._resume, None
        same = r is not None and (r["epoch"], r["batch"]) == (epoch, start_batch)
        if (
            same
            and r is not None
            and (r["streams"], r["shards"], r["samples_per_epoch"])
            == (
                self.streams,
                len(self.urls),
                self.num_samples,
            )
        ):
            pos = _Position(
                epoch,
                r["batch"],
                r["pass"],
                {int(w): (int(k), int(m)) for w, (k, m) in r["start"].items()},
                set(r["ended"]),
                r["turn"],
            )
            self.skips.start_epoch(epoch, r["skipped"], r["seen"])
            self.filtered = r.get("filtered", 0)
            return pos, 0
        if start_batch and r is not None and same:
            rich.get_console().print(
                f"[yellow]data:[/] data.workers, the shards or data.samples_per_epoch changed since the "
                f"checkpoint, so the rest of epoch {epoch} follows the new order (some samples of this "
                f"epoch may repeat or be left out); replaying {start_batch} batches"
            )
        elif start_batch:
            rich.get_console().print(
                f"[yellow]data:[/] the checkpoint holds no stream position; replaying {start_batch} batches "
                f"of epoch {epoch} to resume exactly"
            )
        self.skips.start_epoch(epoch)
        self.filtered = 0
        return _Position(epoch), start_batch

    def _snapshot(self, pos: _Position) -> dict[str, Any]:
        return {
            "kind": "shards",
            "epoch": pos.epoch,
            "batch": pos.batch,
            "pass": pos.pass_,
            "start": {str(w): list(v) for w, v in sorted(pos.start.items())},
            "ended": sorted(pos.ended),
            "turn": pos.turn,
            "streams": self.streams,
            "shards": len(self.urls),
            "samples_per_epoch": self.num_samples,
            "seen": self.skips.seen,
            "skipped": dict(self.skips.epoch),
            "skipped_total": dict(self.skips.total),
            "filtered": self.filtered,
        }

    def _items(self, pos: _Position) -> Iterator[tuple[tuple, torch.Tensor | None]]:
        """The items of one pass in the canonical order, from `pos` on; `pos` follows what is consumed."""
        spec = _StreamSpec(
            self.shard_order(pos.epoch, pos.pass_),
            self.streams,
            self.size,
            self.seed,
            pos.epoch,
            pos.pass_,
            self.buffer,
            self.caption_column,
            self.langs,
            self.select,
            self.counts,
            dict(pos.start),
            set(pos.ended),
        )
        stream = _ShardStream(spec)
        seed = (self.seed * 100_003 + pos.epoch) * 1_009 + pos.pass_
        chunks = iter(_loader(stream, self.workers, seed)) if self.workers else iter(stream)
        queues: dict[int, deque[deque[tuple[tuple, torch.Tensor | None]]]] = {
            w: deque() for w in range(self.streams)
        }
        active = [w for w in range(self.streams) if w not in pos.ended]

        def after(w: int) -> int:
            later = [v for v in active if v > w]
            return later[0] if later else (active[0] if active else 0)

        try:
            while active:
                w = pos.turn if pos.turn in active else after(pos.turn)
                pos.turn = w
                while not queues[w]:
                    try:
                        cw, items, images = next(chunks)
                    except StopIteration:
                        raise RuntimeError(f"data stream {w} ended without its end marker") from None
                    if cw in pos.ended:
                        continue
                    it = iter(images)
                    queues[cw].append(deque((x, next(it) if x[0] == "ok" else None) for x in items))
                chunk = queues[w][0]
                item, image = chunk.popleft()
                if not chunk:
                    queues[w].popleft()
                if item[0] == "end":
                    pos.ended.add(w)
                    active.remove(w)
                    pos.turn = after(w)
                    continue
                if item[0] == "fatal":
                    raise UserError(item[1])
                pos.start[w] = (item[1], item[2] + 1)
                if not chunk:
                    pos.turn = after(w)
                yield item, image
        finally:
            del chunks

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch` from batch `start_batch` on: (uint8 images (B, 3, H, W), captions (B·k,
        image-major), keys (B))."""
        pos, replay = self._start(epoch, start_batch)
        pending: list[tuple[str, list[str], torch.Tensor]] = []
        n = len(self)
        while pos.batch < n:
            fresh, used = not pos.start and not pos.ended, 0
            logged = sum(self.skips.epoch.values())
            for item, image in self._items(pos):
                kind = item[0]
                if kind == "ok":
                    used += 1
                    self.skips.seen += 1
                    pending.append((item[3], item[4], image))  # type: ignore[arg-type]
                    if len(pending) < self.batch_size:
                        continue
                    pos.batch += 1
                    self._state = self._snapshot(pos)
                    batch, pending = pending, []
                    if pos.batch <= replay:
                        continue
                    if self.log and sum(self.skips.epoch.values()) != logged:
                        logged = sum(self.skips.epoch.values())
                        self.log(_data_line(self._state, epoch * n + pos.batch))
                    yield (
                        torch.stack([x for _, _, x in batch]),
                        [
                            c
                            for key, caps, _ in batch
                            for c in choose_captions(caps, key, self.seed, epoch, self.policy, self.per_image)
                        ],
                        [key for key, _, _ in batch],
                    )
                    if pos.batch >= n:
                        return
                elif kind == "skip":
                    _, _, _, reason, key, detail, lost = item
                    self.skips.add(reason, key, detail, lost, quiet=pos.batch < replay)
                elif kind == "filtered":
                    self.filtered += 1
            if fresh and not used:
                raise UserError(
                    f"No usable sample in the training shards ({describe(self.skips.epoch) or 'all filtered'}); "
                    "check them with `lipkit data validate`."
                )
            pos.pass_, pos.start, pos.ended, pos.turn = pos.pass_ + 1, {}, set(), 0


# -- from a config -------------------------------------------------------------------------------


@dataclass
class TrainData:
    """The training source of a config, opened (records read, or shards listed) but not decoded."""

    kind: str
    records: list[Record] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    read_skipped: Counter[str] = field(default_factory=Counter)
    cfg: Any = None

    def captions(self) -> Iterator[str]:
        """Every training caption (for a tokenizer)."""
        if self.kind == "shards":
            return shard_captions(self.urls, self.cfg.caption_column)
        return (c for r in self.records for c in r.captions)

    def batches(
        self, size: int, batch_size: int, seed: int, log: Log | None = None
    ) -> TrainBatches | ShardBatches:
        d = self.cfg
        if self.kind == "shards":
            return ShardBatches(
                self.urls,
                size,
                batch_size,
                seed,
                d.caption_policy,
                d.captions_per_image,
                d.workers,
                samples_per_epoch=d.samples_per_epoch,
                shuffle_buffer=d.shuffle_buffer,
                max_skip_fraction=d.max_skip_fraction,
                caption_column=d.caption_column,
                langs=getattr(d, "caption_langs", []),
                select=getattr(d, "caption_select", []),
                log=log,
            )
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


def open_train_data(d: Any) -> TrainData:
    """The training source named by `d.train` (a DataConfig): a table, parquet, a folder or shards."""
    kind = source_kind(d.train)
    if kind == "shards":
        return TrainData(kind, urls=expand_shards(d.train), cfg=d)
    records, skipped = read_records(d.train, d.image_column, d.caption_column, d.image_root)
    if getattr(d, "caption_langs", None) or getattr(d, "caption_select", None):
        from lipkit.data.captions import filter_captions

        records = filter_captions(records, getattr(d, "caption_select", []), getattr(d, "caption_langs", []))
    return TrainData(kind, records=records, read_skipped=skipped, cfg=d)


def jsonl_log(path: Any) -> Log:
    """A `log` callback that appends one JSON line per record to `path` (e.g. a run's metrics.jsonl)."""
    import json
    from pathlib import Path

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
