"""The Trainer's progress bar (rank 0): steps, the last log line's numbers, elapsed time and an ETA."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lipkit.train.clock import Clock
from lipkit.train.optim import Schedule


class TrainBar:
    def __init__(self, bar: Progress, schedule: Schedule, clock: Clock, step: int) -> None:
        self.bar, self.schedule, self.clock = bar, schedule, clock
        self.task = bar.add_task("train", total=1000, info="", **self._fields(step))

    def _fields(self, step: int) -> dict[str, Any]:
        """The bar follows the schedule's progress (steps, or the time budget when it ends first) in
        permille; the ETA extrapolates the training time spent so far over what is left."""
        p, e = self.schedule.progress(step, self.clock.now), self.clock.elapsed()
        left = e * (1 - p) / p if p > 0 else None
        eta = "–" if left is None else time.strftime("%H:%M:%S", time.gmtime(max(0.0, left)))
        return {"completed": min(1000, int(1000 * p)), "step": f"{step}/{self.schedule.total}", "eta": eta}

    def show(self, step: int) -> None:
        self.bar.update(self.task, **self._fields(step))

    def info(self, text: str) -> None:
        self.bar.update(self.task, info=text)


@contextmanager
def train_bar(schedule: Schedule, clock: Clock, step: int, enabled: bool) -> Iterator[TrainBar]:
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("step {task.fields[step]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
    ]
    with Progress(*columns, disable=not enabled) as bar:
        yield TrainBar(bar, schedule, clock, step)
