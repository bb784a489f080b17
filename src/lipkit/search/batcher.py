"""Micro-batching of model calls for the server: concurrent queries of one kind are encoded together.

A *query kind* (`QueryKind`) is anything with a `name`, an `encode(items) -> (len(items), D)` array that
runs on a worker thread, and a `cache_key(item)` (None: never cached). Text and image queries are two
kinds (`search.query_kinds`); later kinds (token-wise, region, composed image+text, video) plug in the same
way. For each kind one asyncio task takes the queued items — every item already waiting, up to
`max_batch`, then up to `max_wait_ms` more for stragglers — and encodes them in one call on that kind's
own thread, so a text batch and an image batch run side by side on two cores.

Bounded everywhere: the queue (`max_queue` items waiting or being encoded, over which `submit` raises
`Overloaded` → 503 with Retry-After instead of growing latency), the batch, the wait, and the LRU cache of
embeddings by key (`cache_size` entries; concurrent misses of one key share one encode).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lipkit.search.metrics import BATCH_BUCKETS, Counter, Gauge, Histogram, Registry


class QueryKind(Protocol):
    name: str

    def encode(self, items: list[Any]) -> np.ndarray:
        """Rows of embeddings, one per item, in order. Called on a worker thread."""
        ...

    def cache_key(self, item: Any) -> Hashable | None:
        """A key for the embedding cache, or None when this item must always be encoded."""
        ...


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 128
    cache_size: int = 10_000


class Overloaded(Exception):
    """The queue is full; answer 503 and ask the client to come back after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(
            f"The server is busy ({waiting} queries queued, its limit); retry after {retry_after} s, or send "
            "fewer requests at once."
        )
        self.retry_after = retry_after


class LRUCache:
    """At most `size` entries; the least recently used leaves first. Used from the event loop only."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self.data: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def get(self, key: Hashable) -> np.ndarray | None:
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.size == 0:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)

    def __len__(self) -> int:
        return len(self.data)


class _Lane:
    """One kind's queue, worker task, thread and cache."""

    def __init__(self, kind: QueryKind, cache_size: int) -> None:
        self.kind = kind
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"encode-{kind.name}")
        self.cache = LRUCache(cache_size)
        self.inflight: dict[Hashable, asyncio.Future[np.ndarray]] = {}
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending = 0
        self.seconds_per_batch = 0.05  # running mean, for Retry-After


class MicroBatcher:
    def __init__(self, kinds: list[QueryKind], settings: BatchSettings, registry: Registry) -> None:
        self.settings = settings
        self.lanes = {k.name: _Lane(k, settings.cache_size) for k in kinds}
        r = registry
        self.batch_sizes = r.add(
            Histogram("lipkit_batch_size", "Items encoded per model call, by kind.", BATCH_BUCKETS, ("kind",))
        )
        self.cache_hits = r.add(
            Counter("lipkit_cache_hits_total", "Embeddings served from the cache.", ("kind",))
        )
        self.cache_misses = r.add(
            Counter("lipkit_cache_misses_total", "Cache lookups that missed.", ("kind",))
        )
        self.rejected = r.add(
            Counter("lipkit_overload_rejections_total", "Queries refused (503).", ("kind",))
        )
        r.add(Gauge("lipkit_queue_depth", "Queries waiting or being encoded.", lambda: float(self.depth)))
        r.add(
            Gauge("lipkit_cache_entries", "Embeddings held in the cache.", lambda: float(self.cache_entries))
        )
        r.add(Gauge("lipkit_cache_hit_ratio", "Cache hits / lookups since start.", self.hit_ratio))

    @property
    def depth(self) -> int:
        return sum(lane.pending for lane in self.lanes.values())

    @property
    def cache_entries(self) -> int:
        return sum(len(lane.cache) for lane in self.lanes.values())

    def hit_ratio(self) -> float:
        hits = sum(self.cache_hits.values.values())
        total = hits + sum(self.cache_misses.values.values())
        return hits / total if total else 0.0

    async def encode(self, kind: str, item: Any) -> np.ndarray:
        """The embedding row of one item, batched with whatever else of its kind is queued."""
        lane = self.lanes[kind]
        key = lane.kind.cache_key(item) if lane.cache.size else None
        if key is not None:
            hit = lane.cache.get(key)
            if hit is not None:
                self.cache_hits.inc(kind)
                return hit
            self.cache_misses.inc(kind)
            shared = lane.inflight.get(key)
            if shared is not None:  # the same query is already being encoded: wait for that one
                return await asyncio.shield(shared)
        fut = self._submit(lane, item)
        if key is not None:
            lane.inflight[key] = fut
        try:  # shielded: a client that goes away must not cancel what others share
            row = await asyncio.shield(fut)
        finally:
            if key is not None:
                lane.inflight.pop(key, None)
        if key is not None:
            lane.cache.put(key, row)
        return row

    def _submit(self, lane: _Lane, item: Any) -> asyncio.Future[np.ndarray]:
        s = self.settings
        if self.depth >= s.max_queue:
            self.rejected.inc(lane.kind.name)
            batches_ahead = math.ceil(self.depth / max(1, s.max_batch))
            raise Overloaded(self.depth, max(1, math.ceil(batches_ahead * lane.seconds_per_batch)))
        loop = asyncio.get_running_loop()
        if lane.loop is not loop:  # first use, or an app driven by a new event loop (test clients)
            lane.loop, lane.queue, lane.task, lane.pending = loop, asyncio.Queue(), None, 0
            lane.inflight.clear()
        if lane.task is None or lane.task.done():
            lane.task = loop.create_task(self._run(lane))
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        lane.pending += 1
        lane.queue.put_nowait((item, fut))
        return fut

    async def _gather(self, lane: _Lane) -> list[tuple[Any, asyncio.Future[np.ndarray]]]:
        """The next batch: wait for one item, take all queued (≤ max_batch), then wait ≤ max_wait_ms more."""
        s = self.settings
        batch = [await lane.queue.get()]
        deadline = time.monotonic() + s.max_wait_ms / 1000
        while len(batch) < s.max_batch:
            if not lane.queue.empty():
                batch.append(lane.queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(lane.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(lane)
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            try:
                if live:
                    t0 = time.perf_counter()
                    rows = await loop.run_in_executor(
                        lane.executor, self._encode, lane.kind, [i for i, _ in live]
                    )
                    took = time.perf_counter() - t0
                    lane.seconds_per_batch = 0.8 * lane.seconds_per_batch + 0.2 * took
                    self.batch_sizes.observe(len(live), lane.kind.name)
                    for (_, fut), row in zip(live, rows, strict=True):
                        _settle(fut, row)  # a row is a copy: a cached one must not pin its batch
            except BaseException as e:  # the thread is gone (shutdown) or this task is cancelled
                for _, fut in batch:
                    _settle(fut, RuntimeError(f"the {lane.kind.name} encoder stopped ({type(e).__name__})"))
                raise
            finally:
                lane.pending -= len(batch)

    @staticmethod
    def _encode(kind: QueryKind, items: list[Any]) -> list[np.ndarray | BaseException]:
        """One call for the batch; when it fails, each item alone, so one bad item fails only itself."""
        try:
            out = np.asarray(kind.encode(items))
            return [out[i].copy() for i in range(len(items))]
        except Exception as e:  # noqa: BLE001 - handed to the waiting request, which answers it
            if len(items) == 1:
                return [e]
        rows: list[np.ndarray | BaseException] = []
        for item in items:
            try:
                rows.append(np.asarray(kind.encode([item]))[0].copy())
            except Exception as e:  # noqa: BLE001
                rows.append(e)
        return rows

    def close(self) -> None:
        """Stop the workers (at server shutdown); queries still queued get an error, not a hang."""
        for lane in self.lanes.values():
            if lane.task is not None:
                lane.task.cancel()
            while not lane.queue.empty():
                _, fut = lane.queue.get_nowait()
                _settle(fut, RuntimeError("the server is shutting down"))
            lane.executor.shutdown(wait=False, cancel_futures=True)


def _settle(fut: asyncio.Future[np.ndarray], row: np.ndarray | BaseException) -> None:
    if fut.done():
        return
    if isinstance(row, BaseException):
        fut.set_exception(row)
    else:
        fut.set_result(row)
