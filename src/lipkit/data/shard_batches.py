"""WebDataset shards (`ShardBatches`), streamed in a deterministic order that every rank resumes
exactly, whatever the number of ranks and loader workers.

Streams. Each of the `world` ranks runs L = max(1, data.workers) streams (a DataLoader worker each, or
one in-process stream when data.workers is 0): S = world·L in all, rank r's stream w being global
stream g = r·L + w. Epoch e permutes the n shards with (seed, epoch); stream g owns order[g::S] for the
whole epoch and reads them in turn through a shuffle buffer seeded by (seed, epoch, pass, shard),
decoding where it runs (data/shard_streams.py); at the end of its shards it starts its next pass over
the same shards (in an order seeded by (seed, epoch, g, pass)), so no stream ever stalls. When n is not
a multiple of S (or the shards differ in size), the streams that own fewer samples repeat some of them
within an epoch and those that own more leave some for the next epoch, which deals the shards anew.
Fewer shards than streams lower L to max(1, n // world), and L is lowered further to divide the local
batch b (so every stream takes the same share and none idles), both with a note; fewer shards than
ranks is an error. A stream whose whole pass yields no usable sample stops the run with a `UserError`.

Batches. `batch_size` is the global batch; a rank yields local batches of b = batch_size // world: over
its streams w = 0..L-1, the next `share(b, L)[w]` usable samples of stream r·L + w (b split into L
near-equal parts, larger first). Skipped and filtered samples use up stream positions but no share,
so no rank needs another's skips and the order depends on (seed, epoch, S, g) only, never on timing.
The ranks' local batches, concatenated in rank order, are exactly the batches of one process with S
streams (L divides b, see above). An epoch is `samples_per_epoch // batch_size` batches on every rank
(counted from the shards, see `lipkit.data.sources.shards.shard_counts`, or `data.samples_per_epoch`).

Position. After a batch, each stream is at (pass, index of the shard in the pass's order, samples
consumed in it). `state()` holds this rank's streams and their skip counts; `merge_states` joins the
ranks' states, and `load_state` takes its own streams from that, so a checkpoint resumes exactly under
any ranks × workers with the same S: whole shards are skipped unread and the consumed samples of the
current one undecoded. When S, the shards or samples_per_epoch changed, the epoch restarts and replays
the batches done (exact for the new layout, with a note).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import rich
import torch

from lipkit.data.batching import Batch, Log, SkipCounter, choose_captions, data_line
from lipkit.data.caption_mix import check_mix
from lipkit.data.captions import add_meta_captions_checked, check_meta_templates, filter_captions
from lipkit.data.records import Skip, describe
from lipkit.data.shard_streams import (
    Item,
    Row,
    StreamSpec,
    StreamState,
    feed,
    merge_states,
    share,
    streams_per_rank,
)
from lipkit.data.sources.shards import (
    ShardStatus,
    cached_counts,
    clip_settings,
    expand_shards,
    parse_sample,
    read_shard,
    shard_captions,
    shard_counts,
)
from lipkit.data.text_augment import check_text_augment
from lipkit.errors import UserError


class ShardBatches:
    """Deterministic, exactly resumable epochs of this rank's (uint8 images, captions, keys) batches
    streamed from WebDataset shards (see the module docstring for the order and the position)."""

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
        rank: int = 0,
        world: int = 1,
        caption_mix: dict[str, float] | None = None,
        text_augment: dict[str, float] | None = None,
        split_sentences: bool = False,
        clip: tuple[int, str] | None = None,  # clips: (data.num_frames, data.frame_sampling); None: images
    ) -> None:
        check_meta_templates(meta_captions)
        check_mix(caption_mix or {})
        check_text_augment(text_augment or {})
        self.mix = dict(caption_mix or {})
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} ranks")
        self.urls = list(urls)
        self.select, self.meta = list(select), list(meta_captions)
        self.size, self.batch_size, self.seed, self.policy = size, batch_size, seed, caption_policy
        self.per_image, self.log, self.buffer = captions_per_image, log, max(1, shuffle_buffer)
        # how a sample's captions are chosen (batching.choose_captions after the key, seed and epoch)
        self.choice = (caption_policy, captions_per_image, dict(text_augment or {}), split_sentences)
        self.caption_column, self.langs = caption_column, list(langs)
        self.rank, self.world, self.clip = rank, world, clip
        self.counts = cached_counts(self.urls) if samples_per_epoch > 0 else shard_counts(self.urls)
        self.num_samples = samples_per_epoch if samples_per_epoch > 0 else sum(self.counts.values())
        if self.num_samples < batch_size:
            raise UserError(
                f"The training shards hold {self.num_samples} samples, fewer than train.batch_size="
                f"{batch_size}; lower the batch size, add data or set data.samples_per_epoch."
            )
        if batch_size % world:
            raise UserError(
                f"train.batch_size={batch_size} does not split evenly over {world} ranks; choose a "
                f"multiple of {world}."
            )
        if self.meta:
            self._check_meta_fills()
        local = streams_per_rank(len(self.urls), world, rank, batch_size // world, workers)
        self.workers = local if workers > 0 else 0  # DataLoader workers of this rank, one per stream
        self.streams = world * local  # S, over all ranks
        self.local_batch = batch_size // world
        shares = share(self.local_batch, local)
        self._streams = [StreamState(rank * local + w, shares[w]) for w in range(local)]
        self.skips = SkipCounter(max_skip_fraction, self.num_samples // world, "the training shards")
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

    def shard_order(self, epoch: int) -> list[str]:
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009)
        return [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]

    # -- position ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """This rank's data position after the last batch handed out (see `merge_states`)."""
        return dict(self._state)

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """The ranks' states as one: the union of their streams, the sums of their counts."""
        return merge_states(states)

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Resume from a state of `state()` or `merge_states` (this rank takes its own streams)."""
        self._resume = state if state and state.get("kind") == "shards" else None
        if self._resume is not None:
            for s in self._streams:
                s.total = Counter(self._saved(self._resume, s.g).get("skipped_total", {}))
            self.skips.total = sum((s.total for s in self._streams), Counter())

    def _exact(self, r: dict[str, Any]) -> bool:
        """Whether state `r` holds this rank's streams of the same layout (S, shards, epoch size)."""
        start, counts = r.get("start", {}), r.get("counts", {})
        return (r.get("streams"), r.get("shards"), r.get("samples_per_epoch")) == (
            self.streams,
            len(self.urls),
            self.num_samples,
        ) and all(len(start.get(str(s.g), ())) == 3 and str(s.g) in counts for s in self._streams)

    def _saved(self, r: dict[str, Any], g: int) -> dict[str, Any]:
        """Stream g's counts in state `r`; of another layout, the global stream 0 takes the totals."""
        if self._exact(r):
            return r["counts"][str(g)]
        return (
            {"skipped": r.get("skipped", {}), "skipped_total": r.get("skipped_total", {})} if g == 0 else {}
        )

    def _start(self, epoch: int, start_batch: int) -> int:
        """Set the streams where epoch `epoch` continues at batch `start_batch`: the saved position when it
        matches (returns 0), else the epoch start (returns the number of batches to replay)."""
        r, self._resume = self._resume, None
        same = r is not None and (r["epoch"], r["batch"]) == (epoch, start_batch)
        if r is not None and same and self._exact(r):
            for s in self._streams:
                s.restart(r["start"][str(s.g)], r["counts"][str(s.g)])
            self.skips.start_epoch(
                epoch, sum((s.skipped for s in self._streams), Counter()), sum(s.seen for s in self._streams)
            )
            self.filtered = sum(s.filtered for s in self._streams)
            return 0
        if start_batch and r is not None and same:
            rich.get_console().print(
                f"[yellow]data:[/] the number of data streams (ranks × data.workers), the shards or "
                f"data.samples_per_epoch changed since the checkpoint, so the rest of epoch {epoch} follows "
                f"the new order (some samples of this epoch may repeat or be left out); replaying "
                f"{start_batch} batches"
            )
        elif start_batch:
            rich.get_console().print(
                f"[yellow]data:[/] the checkpoint holds no stream position; replaying {start_batch} batches "
                f"of epoch {epoch} to resume exactly"
            )
        for s in self._streams:
            s.restart()
            if start_batch and r is not None and r.get("epoch") == epoch:  # the replay counts them again
                s.total -= Counter(self._saved(r, s.g).get("skipped", {}))
        self.skips.total = sum((s.total for s in self._streams), Counter())
        self.skips.start_epoch(epoch)
        self.filtered = 0
        return start_batch

    def _snapshot(self, epoch: int, batch: int) -> dict[str, Any]:
        return {
            "kind": "shards",
            "epoch": epoch,
            "batch": batch,
            "streams": self.streams,
            "shards": len(self.urls),
            "samples_per_epoch": self.num_samples,
            "start": {str(s.g): [s.pass_, s.k, s.m] for s in self._streams},
            "counts": {str(s.g): s.counts() for s in self._streams},
            "seen": self.skips.seen,
            "skipped": dict(self.skips.epoch),
            "skipped_total": dict(self.skips.total),
            "filtered": self.filtered,
        }

    # -- batches ----------------------------------------------------------------------------------

    def _feeds(self, epoch: int) -> list[Generator[Item]]:
        """Every stream's items from its position on (DataLoader workers start here, all at once)."""
        order, feeds = self.shard_order(epoch), []
        for s in self._streams:
            if not s.share:
                feeds.append(feed(None, False, 0))
                continue
            spec = StreamSpec(
                order,
                self.streams,
                self.size,
                self.seed,
                epoch,
                s.pass_,
                self.buffer,
                self.caption_column,
                self.langs,
                self.select,
                self.counts,
                stream=s.g,
                start=(s.k, s.m),
                passes=0,
                meta=self.meta,
                mix=self.mix,
                clip=self.clip,
            )
            feeds.append(feed(spec, self.workers > 0, (self.seed * 100_003 + epoch) * 1_009 + s.g))
        return feeds

    def _take(self, s: StreamState, items: Iterator[Item], epoch: int, quiet: bool) -> list[Row]:
        """The next `s.share` usable samples of stream `s`; what it skips is counted on the way."""
        rows: list[Row] = []
        while len(rows) < s.share:
            p, item, image = next(items, (0, ("end",), None))
            kind = item[0]
            if kind == "fatal":
                raise UserError(item[1])
            if kind == "empty":
                why = describe(s.skipped) or "all filtered"
                raise UserError(
                    f"No usable sample in the training shards {item[1]} ({why}); check them with "
                    "`lipkit data validate`."
                )
            if kind == "end":
                raise RuntimeError(f"data stream {s.g} ended")
            s.pass_, s.k, s.m = p, item[1], item[2] + 1
            if kind == "ok":
                s.seen += 1
                self.skips.seen += 1
                rows.append((item[3], item[4], image))  # type: ignore[arg-type]
            elif kind == "skip":
                _, _, _, reason, key, detail, lost = item
                s.seen += lost
                s.skipped[reason] += lost
                s.total[reason] += lost
                self.skips.add(reason, key, detail, lost, quiet=quiet)
            elif kind == "filtered":
                s.filtered += 1
                self.filtered += 1
        return rows

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch` from batch `start_batch` on: (uint8 images (b, 3, H, W) or clips,
        captions (b·k, image-major), keys (b)), b = batch_size // world."""
        replay = self._start(epoch, start_batch)
        batch, n = start_batch - replay, len(self)
        if batch >= n:
            return
        feeds = self._feeds(epoch)
        logged = sum(self.skips.epoch.values())
        try:
            while batch < n:
                rows = [
                    r
                    for s, f in zip(self._streams, feeds, strict=True)
                    for r in self._take(s, f, epoch, batch < replay)
                ]
                batch += 1
                self._state = self._snapshot(epoch, batch)
                if batch <= replay:
                    continue
                if self.log and sum(self.skips.epoch.values()) != logged:
                    logged = sum(self.skips.epoch.values())
                    self.log(data_line(self._state, epoch * n + batch))
                yield (
                    torch.stack([x for _, _, x in rows]),
                    [
                        c
                        for key, caps, _ in rows
                        for c in choose_captions(caps, key, self.seed, epoch, *self.choice)
                    ],
                    [key for key, _, _ in rows],
                )
        finally:
            for f in feeds:
                f.close()  # a worker stops with its DataLoader iterator


@dataclass
class ShardSource:
    """A streamed training source: WebDataset shards, listed but not read."""

    urls: list[str]
    cfg: Any = None
    clip: tuple[int, str] | None = None  # clips: (data.num_frames, data.frame_sampling); None: images

    def captions(self) -> Iterator[str]:
        """Every training caption (for a tokenizer)."""
        mix = [c for c in self.cfg.caption_mix if c != self.cfg.caption_column]
        return shard_captions(self.urls, self.cfg.caption_column, mix)

    def batches(
        self,
        size: int,
        batch_size: int,
        seed: int,
        log: Log | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> ShardBatches:
        """Rank `rank` of `world`'s batches (batch_size is the global batch)."""
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
            rank=rank,
            world=world,
            caption_mix=d.caption_mix,
            text_augment=d.text_augment,
            split_sentences=d.split_sentences,
            clip=self.clip,
        )


def open_shards(d: Any) -> ShardSource:
    """The shards `d.train` (a DataConfig's source) names; the sample records are streamed per epoch."""
    urls = expand_shards(d.train)
    return ShardSource(urls, d, clip_settings(urls[0], d.num_frames, d.frame_sampling))  # its first sample
