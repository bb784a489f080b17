"""One data stream of WebDataset samples for `ShardBatches` (data/shard_batches.py): global stream g
of S owns the shards `urls[g::S]` of the epoch's shard order and reads them in turn through a seeded
shuffle buffer, parsed, caption-filtered and decoded where it runs (a DataLoader worker, or the main
process), pass after pass, and hands them over in chunks of `CHUNK` samples with fixed boundaries.

Pass 0 reads the shards in the order dealt; pass p > 0 in an order seeded by (seed, epoch, g, p). The
shuffle buffer of a shard is seeded by (seed, epoch, pass, shard), so what a stream yields depends on
(seed, epoch, S, g) only. A stream whose whole pass yields no usable sample says so (an "empty" item)
and ends, rather than reading the same broken shards forever.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import rich
import torch
from torch.utils.data import IterableDataset

from lipkit.data.batching import decode_record
from lipkit.data.caption_mix import mixed_captions
from lipkit.data.captions import filter_captions
from lipkit.data.frames import mixed_kinds, with_frame_count
from lipkit.data.image_store import worker_loader
from lipkit.data.records import Skip
from lipkit.data.sources.shards import ShardStatus, parse_sample, read_shard, shard_name
from lipkit.errors import UserError

CHUNK = 16  # samples per chunk a stream hands over (fixed boundaries within a shard)

Chunk = tuple[int, list[tuple], torch.Tensor]  # (pass, items, images of the "ok" items)
Item = tuple[int, tuple, torch.Tensor | None]  # pass, item, image
Row = tuple[str, list[str], torch.Tensor]  # key, captions, uint8 image


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


def pass_shards(urls: list[str], streams: int, stream: int, seed: int, epoch: int, pass_: int) -> list[str]:
    """The shards global stream `stream` of `streams` reads in pass `pass_` of an epoch whose shard
    order is `urls`: `urls[stream::streams]`, reshuffled for every pass after the first."""
    mine = urls[stream::streams]
    if pass_:
        random.Random(f"{seed}/{epoch}/{stream}/{pass_}").shuffle(mine)
    return mine


@dataclass
class StreamSpec:
    urls: list[str]  # the epoch's shard order; global stream g reads urls[g::streams]
    streams: int  # S, the global number of streams
    size: int
    seed: int
    epoch: int
    pass_: int  # the pass to start in
    buffer: int
    caption_column: str
    langs: list[str]
    select: list[int]
    counts: dict[str, int]
    stream: int = 0  # g
    start: tuple[int, int] = (0, 0)  # (shard index in the pass order, samples consumed in it)
    passes: int = 1  # passes to read, then an "end" item; 0: pass after pass, never ending
    meta: list[str] = field(default_factory=list)  # data.meta_captions templates
    mix: dict[str, float] = field(default_factory=dict)  # data.caption_mix (data/caption_mix.py)
    clip: tuple[int, str] | None = None  # clips (data.num_frames, data.frame_sampling), or None: images


class ShardStream(IterableDataset):
    """One global stream's samples, as chunks (pass, items, images): an item is ("ok", k, m, key,
    captions) with its image in `images`, ("skip", k, m, reason, key, detail, lost), ("filtered", k, m),
    ("fatal", message), ("empty", shard names) (a whole pass without a usable sample; the stream ends)
    or ("end",); k indexes the shard in the pass's order, m the sample in the shard's shuffled order."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[Chunk]:
        spec = self.spec
        p, (k0, m0) = spec.pass_, spec.start
        try:
            while True:
                usable = False
                shards = pass_shards(spec.urls, spec.streams, spec.stream, spec.seed, spec.epoch, p)
                for k in range(k0, len(shards)):
                    for chunk in self._shard(p, k, shards[k], m0 if k == k0 else 0):
                        usable = usable or chunk[2].shape[0] > 0
                        yield chunk
                full, p, k0, m0 = (k0, m0) == (0, 0), p + 1, 0, 0
                if spec.passes and p >= spec.pass_ + spec.passes:
                    break
                if full and not usable:
                    names = ", ".join(shard_name(u) for u in shards[:3]) + (" …" if len(shards) > 3 else "")
                    yield p - 1, [("empty", names)], self._empty()
                    return
        except UserError as e:
            yield p, [("fatal", str(e))], self._empty()
            return
        yield p, [("end",)], self._empty()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, 3, self.spec.size, self.spec.size, dtype=torch.uint8)

    def _shard(self, p: int, k: int, url: str, skip: int) -> Iterator[Chunk]:
        spec = self.spec
        rng = random.Random(f"{spec.seed}/{spec.epoch}/{p}/{shard_name(url)}")
        status = ShardStatus(url)
        items: list[tuple] = []
        images: list[torch.Tensor] = []
        group = None

        def add(m: int, item: tuple, image: torch.Tensor | None) -> Iterator[Chunk]:
            nonlocal group, items, images
            if group is not None and m // CHUNK != group and items:
                yield p, items, torch.stack(images) if images else self._empty()
                items, images = [], []
            group = m // CHUNK
            items.append(item)
            if image is not None:
                images.append(image)

        for m, sample in enumerate(_shuffled(read_shard(url, status), rng, spec.buffer)):
            if m >= skip:  # the consumed samples of a resumed shard: read, never parsed nor decoded
                yield from add(m, *self._item(k, m, sample))
        if status.reason and status.samples >= skip:
            s = status.skip(spec.counts.get(url))
            yield from add(
                status.samples, ("skip", k, status.samples, s.reason, s.key, s.detail, s.count), None
            )
        if items:
            yield p, items, torch.stack(images) if images else self._empty()

    def _item(self, k: int, m: int, sample: dict[str, Any]) -> tuple[tuple, torch.Tensor | None]:
        spec = self.spec
        parsed = parse_sample(sample, spec.caption_column)
        if isinstance(parsed, Skip):
            return ("skip", k, m, parsed.reason, parsed.key, parsed.detail, 1), None
        if spec.langs or spec.select or spec.meta:
            kept = filter_captions([parsed], spec.select, spec.langs, spec.meta)
            if not kept:
                return ("filtered", k, m), None
            parsed = kept[0]
        if (parsed.frames is not None) != (spec.clip is not None):  # the first shard's first sample decides
            raise mixed_kinds(parsed.key, parsed.frames is not None, "The training shards")
        if spec.clip is not None:  # a clip: data.num_frames frames by data.frame_sampling
            with_frame_count([parsed], *spec.clip)
        image, reason, detail = decode_record(parsed, spec.size)
        if image is None:
            return ("skip", k, m, reason, parsed.key, detail, 1), None
        caps = parsed.captions
        if spec.mix:  # the epoch's source for this sample: a function of (seed, epoch, key) alone
            caps = mixed_captions(
                caps, parsed.meta, parsed.key, spec.seed, spec.epoch, spec.caption_column, spec.mix
            )
        return ("ok", k, m, parsed.key, caps), image


# -- the main process's side -------------------------------------------------------------------


def feed(spec: StreamSpec | None, in_worker: bool, seed: int) -> Generator[Item]:
    """The items of a stream with their images, read in a DataLoader worker of its own (started now) or
    in this process (lazily); none for no spec."""
    if spec is None:
        return _items(iter(()))
    return _items(iter(worker_loader(ShardStream(spec), 1, seed)) if in_worker else iter(ShardStream(spec)))


def _items(chunks: Iterator[Chunk]) -> Generator[Item]:
    for p, items, images in chunks:
        it = iter(images)
        for x in items:
            yield p, x, (next(it) if x[0] == "ok" else None)


def share(b: int, parts: int) -> list[int]:
    """`b` split into `parts` near-equal parts, larger first."""
    return [b // parts + (1 if i < b % parts else 0) for i in range(parts)]


@dataclass
class StreamState:
    """One of a rank's streams as its main process follows it: the global index g, the share of a local
    batch, the position and the skip counts (this epoch; all epochs in `total`)."""

    g: int
    share: int
    pass_: int = 0
    k: int = 0
    m: int = 0
    seen: int = 0
    filtered: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)

    def restart(self, start: Sequence[int] = (0, 0, 0), counts: dict[str, Any] | None = None) -> None:
        c = counts or {}
        self.pass_, self.k, self.m = (int(x) for x in start)
        self.seen, self.filtered = int(c.get("seen", 0)), int(c.get("filtered", 0))
        self.skipped = Counter(c.get("skipped", {}))

    def counts(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "filtered": self.filtered,
            "skipped": dict(self.skipped),
            "skipped_total": dict(self.total),
        }


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' states as one: the union of their streams, the sums of their counts."""
    first = states[0]
    same = ("kind", "epoch", "batch", "streams", "shards", "samples_per_epoch")
    for s in states[1:]:
        if any(s.get(key) != first.get(key) for key in same):
            raise ValueError(f"data states of different layouts or positions: {[s.get(k) for k in same]}")
    merged = {key: first.get(key) for key in same}
    for part in ("start", "counts"):
        merged[part] = {g: v for s in states for g, v in s.get(part, {}).items()}
        if len(merged[part]) != sum(len(s.get(part, {})) for s in states):
            raise ValueError(f"data states with overlapping streams: {[sorted(s[part]) for s in states]}")
    for key in ("seen", "filtered"):
        merged[key] = sum(int(s.get(key, 0)) for s in states)
    for key in ("skipped", "skipped_total"):
        merged[key] = dict(sum((Counter(s.get(key, {})) for s in states), Counter()))
    return merged


def streams_per_rank(n: int, world: int, rank: int, b: int, workers: int) -> int:
    """L = max(1, workers) streams per rank, lowered (with a note from rank 0) so that every one of the
    world·L streams owns one of the `n` shards and takes an equal share of the rank's batch of `b` (L
    divides it: no stream idles or falls behind); fewer shards than ranks is an error."""
    if n < world:
        raise UserError(
            f"{world} ranks need at least {world} shards, but the training data has {n}; write more, "
            "smaller shards (lipkit data convert --shard-size) or use fewer ranks."
        )
    wanted = max(1, workers)
    local = min(wanted, max(1, n // world))
    while b % local:
        local -= 1
    if local < wanted and rank == 0:
        why = (
            f"{n} shards feed at most {n // world} data stream(s) per rank on {world} rank(s)"
            if n < world * wanted
            else f"each rank's {b} samples a batch split evenly over at most {local} data stream(s)"
        )
        rich.get_console().print(
            f"[yellow]data:[/] {why}, so each rank reads with {local} instead of data.workers={workers}",
            highlight=False,
        )
    return local
