"""When the Trainer writes a checkpoint: every `train.save_every` steps, at the end of the run, and
after a stop signal (graceful preemption).

SIGTERM/SIGINT: finish the step, checkpoint, exit EXIT_PREEMPTED; a second signal exits at once.
Alone, a process stops after the step it got the signal in; distributed, the ranks agree on the signal
after every step (`Clock.sync`), so all stop after the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Preemption:
    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed
        self.pending: int | None = None  # a signal this process received, not yet agreed on
        self.agreed: int | None = None  # the stop every rank agreed on (after the same step)

    def handler(self, signum: int, _frame: Any) -> None:
        if self.pending is not None:
            os._exit(128 + signum)
        self.pending = signum
        if not self.distributed:  # alone: stop after this step; distributed: after the next sync
            self.agreed = signum
        print(
            f"\nlipkit: got signal {signum}; finishing this step and writing a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The handler on SIGTERM and SIGINT while inside (main thread only: others can't set one)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def on_save_cadence(save_every: int, step: int) -> bool:
    """`step` is one of the `train.save_every` steps: its periodic checkpoint is written already, so a
    stop signal after it needs no second one."""
    return bool(save_every) and step % save_every == 0
