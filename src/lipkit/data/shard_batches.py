"""WebDataset shards (`ShardBatches`), streamed with a deterministic, exactly resumable order.

Epoch e permutes the shards with (seed, epoch), deals them round-robin to W worker streams
(W = data.workers, one in-process stream when 0), and each stream reads its shards in turn through a
shuffle buffer seeded by (seed, epoch, shard), decoding in the worker. The main process merges the
streams in a fixed order (round-robin over chunks of 16 samples with fixed boundaries), so the sample
order depends on the seed and W only, never on timing. The data position after a batch is, per stream,
(shard, samples consumed in it); resuming skips whole shards unread and the consumed part of the
current one undecoded, then continues with exactly the next batch. An epoch is
`samples_per_epoch // batch_size` batches (counted once from the shards, see
`lipkit.data.sources.shards.shard_counts`, or `data.samples_per_epoch`); when skipped samples leave a pass
short, the epoch goes on with a second pass over the shards (order seeded by the pass too).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import rich
import torch

from lipkit.data.batching import Batch, Log, SkipCounter, choose_captions, data_line
from lipkit.data.captions import add_meta_captions_checked, check_meta_templates, filter_captions
from lipkit.data.records import Skip, describe
from lipkit.data.shard_streams import ShardStream, StreamSpec
from lipkit.data.sources.shards import (
    ShardStatus,
    cached_counts,
    expand_shards,
    parse_sample,
    read_shard,
    shard_captions,
    shard_counts,
)
from lipkit.data.table_batches import worker_loader
from lipkit.errors import UserError


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
        meta_captions: Sequence[str] = (),
        log: Log | None = None,
    ) -> None:
        check_meta_templates(meta_captions)
        self.urls = list(urls)
        self.select, self.meta = list(select), list(meta_captions)
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
        if self.meta:
            self._check_meta_fills()
        self.workers = min(max(0, workers), len(self.urls))
        self.streams = max(1, self.workers)
        self.skips = SkipCounter(max_skip_fraction, self.num_samples, "the training shards")
        self.filtered = 0
        self._resume: dict[str, Any] | None = None
        self._state: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def _check_meta_fills(self, peek: int = 100) -> None:
        """data.meta_captions that fill nothing in the first shard's first samples are a clear error now,
        not a silent run without the captions they were meant to add."""
        records: list = []
        for sample in read_shard(self.urls[0], ShardStatus(self.urls[0])):
            parsed = parse_sample(sample, self.caption_column)
            if not isinstance(parsed, Skip):
                records.extend(filter_captions([parsed], self.select, self.langs))
            if len(records) >= peek:
                break
        add_meta_captions_checked(records, self.meta, f"the first samples of {self.urls[0]}")

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
        spec = StreamSpec(
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
            meta=self.meta,
        )
        stream = ShardStream(spec)
        seed = (self.seed * 100_003 + pos.epoch) * 1_009 + pos.pass_
        chunks = iter(worker_loader(stream, self.workers, seed)) if self.workers else iter(stream)
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
                        self.log(data_line(self._state, epoch * n + pos.batch))
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


@dataclass
class ShardSource:
    """A streamed training source: WebDataset shards, listed but not read."""

    urls: list[str]
    cfg: Any = None

    def captions(self) -> Iterator[str]:
        """Every training caption (for a tokenizer)."""
        return shard_captions(self.urls, self.cfg.caption_column)

    def batches(self, size: int, batch_size: int, seed: int, log: Log | None = None) -> ShardBatches:
        d = self.cfg
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
            langs=d.caption_langs,
            select=d.caption_select,
            meta_captions=d.meta_captions,
            log=log,
        )


def open_shards(d: Any) -> ShardSource:
    """The shards `d.train` (a DataConfig's source) names; the sample records are streamed per epoch."""
    return ShardSource(expand_shards(d.train), d)
