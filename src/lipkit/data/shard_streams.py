"""One worker's stream of WebDataset samples for `ShardBatches` (data/shard_batches.py): its shards
read in turn through a seeded shuffle buffer, parsed, caption-filtered and decoded in the worker, and
handed over in chunks of `CHUNK` samples with fixed boundaries (part of the deterministic order)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lipkit.data.batching import decode_record
from lipkit.data.captions import filter_captions
from lipkit.data.records import Skip
from lipkit.data.sources.shards import ShardStatus, parse_sample, read_shard, shard_name
from lipkit.errors import UserError

CHUNK = 16  # samples per chunk a worker stream hands over (fixed boundaries: part of the order)


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
class StreamSpec:
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
    meta: list[str] = field(default_factory=list)  # data.meta_captions templates


class ShardStream(IterableDataset):
    """One worker's part of an epoch pass, as chunks (stream, items, images): an item is
    ("ok", shard, m, key, captions) with its image in `images`, ("skip", shard, m, reason, key, detail,
    lost), ("filtered", shard, m), ("fatal", message) or ("end",)."""

    def __init__(self, spec: StreamSpec) -> None:
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
        if spec.langs or spec.select or spec.meta:
            kept = filter_captions([parsed], spec.select, spec.langs, spec.meta)
            if not kept:
                return ("filtered", k, m), None
            parsed = kept[0]
        image, reason, detail = decode_record(parsed, spec.size)
        if image is None:
            return ("skip", k, m, reason, parsed.key, detail, 1), None
        return ("ok", k, m, parsed.key, parsed.captions), image
