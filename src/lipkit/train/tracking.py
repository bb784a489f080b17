"""Experiment trackers, as OpenCLIP's `--report-to`: `train.report_to` lists any of tensorboard, wandb and
mlflow, and every line written to metrics.jsonl goes to each of them too (its numbers, with the line's
step as the step axis, see `scalars`), as do the report's images when `lipkit demo` or `lipkit report`
writes it (`log_report`).

The backends, one small class each behind one interface, are in `tracker_backends`; each imports its
library only when a run reports to it. A missing library is a `UserError` on every rank before any
training starts, and so is a tracker that cannot start (W&B not logged in): they start before the model
is built. A tracker that fails later (MLflow's server gone) is one warning, and gets nothing more from
the run, which goes on. Only the main rank logs. Run directory:

    tracking.json   the trackers' run ids, how far each was sent ("sent") and the run's "status"
                    (running, finished, failed): a resumed run (train.resume) continues them, a fresh
                    run into the same directory starts new ones (launch removes it for a fresh run)
    tensorboard/    TensorBoard event files
    wandb/          W&B's local files (WANDB_MODE=offline: wandb/offline-run-*, for `wandb sync`)
    mlruns/         MLflow's file store, unless MLFLOW_TRACKING_URI names another store or a server

A resumed run continues each tracker's step axis without duplicated or rewound steps: TensorBoard hides
the steps after the checkpoint (SummaryWriter's purge_step) and gets them again; W&B ignores a step it
has passed and MLflow would keep a second value for it, so there the lines earlier processes already
sent (after the checkpoint, up to the highest step any of them sent: tracking.json's "sent", or
metrics.jsonl's last step) keep their first values and are not sent again, with a warning. On a CPU,
where resuming is exact, only their timings differ from metrics.jsonl's; after a fault, or a resume from
an earlier checkpoint, the values differ too.

The report's images go to the runs of tracking.json and leave their status as it was: MLflow's run only
gets artifacts; W&B adds to a run only by reopening (resuming) and finishing it, so they go only to a
W&B run that finished or failed, which is finished again with the same exit code, never to one that is
still training or was killed. Anything that goes wrong there is a note, not an error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from lipkit.atomic import write_json_atomic
from lipkit.config import Config
from lipkit.errors import UserError
from lipkit.train.distributed import gather_objects
from lipkit.train.tracker_backends import (
    BACKENDS,
    STATE,
    Start,
    Tracker,
    first_line,
    leaves,
    require,
    sentence,
)

__all__ = ["BACKENDS", "STATE", "Start", "Trackers", "last_step", "log_report", "open_trackers", "scalars"]
Log = Callable[[dict[str, Any]], None]
console = Console(stderr=True)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl line as tracker tags: `<kind>/<key>` (`train/loss`), an eval
    line's `eval/<split>/<metric>` (`eval/test-style/zeroshot/category/top1`), nested counts joined with
    '/' (`data/skipped/unreadable`). The step is the axis; strings and lists are left out."""
    kind = str(record.get("kind", "log"))
    prefix = f"{kind}/{record['split']}" if record.get("split") else kind
    body = {k: v for k, v in record.items() if k not in ("kind", "step", "split", "metrics")}
    body.update(record.get("metrics") or {})
    return {f"{prefix}/{k}": float(v) for k, v in leaves(body) if isinstance(v, int | float) and k}


def last_step(metrics: Path) -> int:
    """The highest step in a metrics.jsonl (0 for none): how far an earlier process logged."""
    steps = [0]
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # a line cut short by a kill
                steps.append(int(json.loads(line).get("step", 0)))
    return max(steps)


@dataclass
class _Open:
    name: str
    tracker: Tracker
    through: int  # lines up to this step are not sent (an earlier process sent them)
    working: bool = True  # False once a call failed: it gets nothing more


class Trackers:
    """The trackers of a run (none on ranks other than the main one, or with an empty train.report_to).
    `with trackers:` starts or continues their runs and finishes them (start it before logging); calling
    it with a metrics line sends that line's scalars. `sent`: by tracker, the highest step earlier
    processes of this run sent it. `distributed`: every rank enters, and learns whether rank 0's started."""

    def __init__(
        self, names: list[str], start: Start, sent: dict[str, int] | None = None, distributed: bool = False
    ) -> None:
        self.names, self.start, self.sent, self.distributed = names, start, sent or {}, distributed
        self.open: list[_Open] = []
        self.state: dict[str, Any] | None = None  # what tracking.json holds, once written

    def __enter__(self) -> Trackers:
        failure = None
        try:
            self._start()
        except BaseException as e:
            self.close(failed=True)  # those already started
            if not (self.distributed and isinstance(e, Exception)):
                raise
            failure = e
        if self.distributed:  # the run's first collective: no rank goes on to wait for a rank 0 that stopped
            started = gather_objects(failure is None)
            if failure is not None:
                raise failure
            if not all(started):
                raise UserError(
                    "Rank 0 could not start the trackers of train.report_to (its output says why); fix that "
                    "or remove them from train.report_to."
                )
        return self

    def _start(self) -> None:
        s = self.start
        for name in self.names:
            tracker = BACKENDS[name](s)
            resent = tracker.continued and not tracker.purges
            self.open.append(_Open(name, tracker, self.sent.get(name, 0) if resent else -1))
        if not self.names:
            return
        ids = {o.name: o.tracker.id for o in self.open if o.tracker.id}
        sent = {**self.sent, **{o.name: max(o.through, s.resume_step) for o in self.open}}
        kept = s.ids if s.mode == "resume" else {}
        self.state = dict(
            report_to=self.names, name=s.name, project=s.project, ids={**kept, **ids}, sent=sent
        )
        self.status("running")
        kept_values = [o for o in self.open if o.through > s.resume_step]
        if kept_values:  # after a kill, or after a fault and a resume from an earlier checkpoint
            names, through = " and ".join(o.name for o in kept_values), max(o.through for o in kept_values)
            console.print(
                f"[yellow]resuming after step {s.resume_step}:[/] in {names}, steps {s.resume_step + 1}.."
                f"{through} keep the values an earlier process sent (they are not sent again); metrics.jsonl "
                "and TensorBoard get this process's",
                soft_wrap=True,
            )

    def status(self, status: str) -> None:
        if self.state is not None:
            self.state["status"] = status
            write_json_atomic(self.start.run_dir / STATE, self.state)

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(failed=kind is not None)

    def close(self, failed: bool) -> None:
        """Finish each tracker's run, each on its own: one that fails to is a warning, which never takes
        the place of the error that ended training."""
        for o in self.open:
            if o.working:
                self._call(o, "could not finish its run", o.tracker.close, failed)
            else:  # it failed before: no second warning
                with contextlib.suppress(Exception):
                    o.tracker.close(failed)
        self.open = []
        try:
            self.status("failed" if failed else "finished")
        except OSError as e:
            console.print(f"[yellow]{STATE} not updated[/] ({escape(first_line(e))})", soft_wrap=True)

    def _call(self, o: _Open, failing: str, call: Callable[..., None], *args: Any) -> None:
        """`call(*args)`; if it fails, one warning, and the tracker gets nothing more."""
        try:
            call(*args)
        except Exception as e:
            o.working = False
            console.print(
                f"[yellow]experiment tracker {o.name} {failing}[/] ({escape(sentence(e))}); it gets nothing "
                "more from this run, which goes on (metrics.jsonl has every line)",
                soft_wrap=True,
            )

    def __call__(self, record: dict[str, Any]) -> None:
        step, values = int(record.get("step", 0)), scalars(record)
        for o in self.open:
            if o.working and values and step > o.through:
                self._call(o, "failed", o.tracker.scalars, step, values)

    def tee(self, log: Log) -> Log:
        """`log` (metrics.jsonl), then the trackers: every line that goes to one goes to both."""
        if not self.names:
            return log

        def both(record: dict[str, Any]) -> None:
            log(record)
            self(record)

        return both


def open_trackers(
    cfg: Config, run_dir: Path, resume: Path | None, main: bool, distributed: bool = False
) -> Trackers:
    """The trackers of `train.report_to`, not started yet (`with` starts them); every rank checks now
    that their libraries import. Call before a resumed run's metrics.jsonl is cut back to its checkpoint:
    how far the interrupted process logged is read from it. A fresh run's main rank removes the
    tracking.json of the run before it, trackers or not: `lipkit report` would post into its runs."""
    t = cfg.train
    for name in t.report_to:
        require(name)
    start = Start(run_dir, t.run_name or run_dir.resolve().name, t.project, config=cfg.to_dict())
    if main and resume is None:  # rank 0 alone: another rank's removal could come after rank 0 wrote it
        (run_dir / STATE).unlink(missing_ok=True)
    if not main or not t.report_to:
        return Trackers([], start, distributed=distributed)
    if resume is None:
        return Trackers(list(t.report_to), start, distributed=distributed)
    step = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))["step"]
    state = _state(run_dir)
    start.mode, start.resume_step, start.ids = "resume", int(step), state.get("ids", {})
    # how far each was sent: what tracking.json says (an earlier process may have sent steps that a later
    # one cut from metrics.jsonl, then died before logging them again), or the last process's last line
    last, stored = last_step(run_dir / "metrics.jsonl"), state.get("sent", {})
    sent = {**stored, **{n: max(int(stored.get(n, 0)), last) for n in state.get("report_to", [])}}
    return Trackers(list(t.report_to), start, sent, distributed)


def _state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def log_report(run_dir: Path, report_dir: Path) -> list[str]:
    """Send the report's PNGs (report_dir/*.png as `report/<name>`) to the trackers the run reported to
    (its tracking.json), at its last step, leaving their runs' status as it is. Returns one sentence for
    each tracker that did not get them (its library missing here, its run not in its store, W&B not
    logged in, ...); a run without trackers: nothing to do."""
    run_dir = Path(run_dir)
    state = _state(run_dir)
    images = {f"report/{p.stem}": p for p in sorted(Path(report_dir).glob("*.png"))}
    if not images or not state.get("report_to"):
        return []
    name, project = state.get("name") or run_dir.resolve().name, state.get("project") or "lipkit"
    start = Start(run_dir, name, project, "report", state.get("ids", {}), status=state.get("status", ""))
    step, notes = last_step(run_dir / "metrics.jsonl"), []
    for tracker_name in state["report_to"]:
        try:
            require(tracker_name)
            tracker = BACKENDS[tracker_name](start)
            try:
                tracker.images(step, images)
            finally:
                tracker.close(None)  # the run's status as it was
        except Exception as e:  # a note: the report is written, and the run's trackers are not this command's
            notes.append(f"The report's images were not sent to {tracker_name}: {sentence(e)}")
    return notes
