"""One pass over a data source with a progress bar, and the `Report` of what it found: the shared
machinery of `lipkit data convert | inspect | validate` (data/convert.py, data/inspection.py)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lipkit.data.records import Record, Skip


@dataclass
class Report:
    """What a pass over a source found."""

    samples: int = 0  # usable samples
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> (key, detail)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def skip(self, s: Skip, keep: int = 10) -> None:
        self.skipped[s.reason] += s.count
        ex = self.examples.setdefault(s.reason, [])
        if len(ex) < keep:
            ex.append((s.key, s.detail))

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "skipped": dict(self.skipped),
            "examples": {r: [list(x) for x in ex] for r, ex in self.examples.items()},
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


def run_pass(
    items: Iterable[Record | Skip],
    desc: str,
    total: int | None,
    progress: bool,
    work: Callable[[Record], Skip | None],
    report: Report,
) -> Report:
    """Call `work` on every record (a Skip from reading is counted as it is) and count its outcome
    (None: a usable sample) into `report`, with a progress bar unless `progress` is False."""
    start = time.perf_counter()
    with _progress() if progress else _NoBar() as bar:
        task = bar.add_task(desc, total=total, info="")
        n = 0
        for n, item in enumerate(items, 1):
            outcome = item if isinstance(item, Skip) else work(item)
            if outcome is None:
                report.samples += 1
            else:
                report.skip(outcome)
            if n % 64 == 0 or total is None:
                bar.update(task, completed=n, info=_rate(report, start))
        bar.update(task, completed=n, total=total if total else n, info=_rate(report, start))
    report.seconds = time.perf_counter() - start
    return report


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        transient=False,
    )


def _rate(report: Report, start: float) -> str:
    rate = report.samples / max(1e-9, time.perf_counter() - start)
    return f"{rate:,.0f} samples/s  {sum(report.skipped.values())} skipped"


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *args: object) -> None:
        return None

    def add_task(self, *args: object, **kw: object) -> int:
        return 0

    def update(self, *args: object, **kw: object) -> None:
        return None
