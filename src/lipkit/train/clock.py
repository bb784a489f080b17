"""The Trainer's clocks: training wall time (the time budget and the schedule follow it), the clock the
ranks share, and the samples/s of the log lines.

Training time is that of earlier processes of the run (a resume) plus this process's, less the time
spent evaluating. Distributed, every rank reads the ranks' common clock after each step (see
`distributed.sync_step`), so the time budget stops them all after the same step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from lipkit.train.distributed import sync_step


class Clock:
    def __init__(self, before: float) -> None:
        self.before = before  # training seconds of earlier processes (and up to the last checkpoint)
        self.start = time.perf_counter()
        self.evaluating = 0.0  # seconds spent evaluating since `start`
        self.synced: float | None = None  # distributed: the ranks' common clock after the last step

    def elapsed(self) -> float:
        """This rank's own training time."""
        return self.before + time.perf_counter() - self.start - self.evaluating

    def now(self) -> float:
        """The training time the schedule and the budget follow: the common clock when distributed."""
        return self.synced if self.synced is not None else self.elapsed()

    def sync(self, pending: int | None) -> int | None:
        """Every rank: agree on the clock and on a stop signal (a collective); returns the signal."""
        signum, self.synced = sync_step(pending, self.elapsed())
        return signum

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluating) is not training time."""
        t = time.perf_counter()
        yield
        self.evaluating += time.perf_counter() - t

    def restart(self) -> float:
        """At a checkpoint: fold the time so far into `before`, count on from now; returns `before`."""
        self.before, t0 = self.elapsed(), time.perf_counter()
        self.start, self.evaluating = t0, 0.0
        return self.before


class Throughput:
    """Samples per second between two log lines."""

    def __init__(self, step: int, batch_size: int) -> None:
        self.t, self.step, self.batch_size = time.perf_counter(), step, batch_size

    def samples_per_s(self, step: int) -> float:
        now = time.perf_counter()
        sps = (step - self.step) * self.batch_size / max(1e-9, now - self.t)
        self.t, self.step = now, step
        return sps
