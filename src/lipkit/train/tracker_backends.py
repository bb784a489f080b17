"""The experiment trackers' backends (`lipkit.train.tracking` drives them): one small class each for
TensorBoard, W&B and MLflow behind one interface (`Tracker`), each importing its library only when a
run reports to it; `require` turns a missing library into a one-sentence UserError naming the extra."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lipkit.errors import UserError, import_optional

STATE = "tracking.json"  # in the run directory: the trackers' run ids, how far each was sent, the status


def require(name: str) -> Any:
    """The library of tracker `name`, imported; a missing one is a UserError naming the extra."""
    return import_optional(
        name,
        lambda e: (
            f"train.report_to includes {name}, but the {name} library cannot be imported ({e}); install "
            f"it with pip install 'lipkit[{name}]' or remove {name} from train.report_to."
        ),
    )


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}/{k}" if path else str(k))
    else:
        yield path, value


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


def sentence(e: Exception) -> str:
    """A UserError's message, or the first line of any other error with its type."""
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e)}."


def _mlflow_key(tag: str) -> str:
    """MLflow's metric and param names take letters, digits and _ - . / space only: `R@1` → `R_1`."""
    return re.sub(r"[^\w\-. /]", "_", tag)


@dataclass
class Start:
    """How the trackers' runs begin: "new", "resume" (after the checkpoint of step `resume_step`) or
    "report" (the run of tracking.json reopened for the report's images, whose `status` it was)."""

    run_dir: Path
    name: str  # the run's name in W&B and MLflow
    project: str  # the W&B project and the MLflow experiment
    mode: str = "new"
    ids: dict[str, str] = field(default_factory=dict)  # runs to continue (tracking.json), by tracker
    resume_step: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the run's config: W&B config, MLflow params
    status: str = "running"  # report mode: the run's, from tracking.json (running, finished, failed)


class Tracker(Protocol):
    continued: bool  # it continues a run of an earlier process
    purges: bool  # it hides that run's steps after the resume point itself (else they are not resent)
    id: str | None  # what tracking.json keeps to continue it

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def images(self, step: int, images: dict[str, Path]) -> None: ...
    def close(self, failed: bool | None) -> None: ...  # None (report mode): the run's status as it was


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard (torch's SummaryWriter). A resumed run's writer purges the
    steps after its checkpoint; a new run removes the event files of the run that was there before."""

    purges, id = True, None

    def __init__(self, s: Start) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = s.run_dir / "tensorboard"
        if s.mode == "new":
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.continued = s.mode != "new"
        purge = s.resume_step + 1 if s.mode == "resume" else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, step: int, images: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for tag, path in images.items():
            with Image.open(path) as im:
                self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self, failed: bool | None) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run; a resumed run continues it by its id (resume="allow"), a new one gets the config. W&B's
    own environment applies: WANDB_MODE=offline (files for `wandb sync` under <run dir>/wandb),
    WANDB_ENTITY, WANDB_API_KEY, ... W&B adds to a run only by reopening and finishing it: report mode
    reopens only a run that ended (resume="must") and finishes it again as it ended (0 or 1)."""

    purges = False

    def __init__(self, s: Start) -> None:
        import wandb

        run_id = s.ids.get("wandb") if s.mode != "new" else None
        if s.mode == "report" and (run_id is None or s.status not in ("finished", "failed")):
            raise UserError(
                f"{STATE} names no W&B run."
                if run_id is None
                else "its W&B run has not ended (still training, or killed), and adding to it would end "
                "it; run `lipkit report` again once training has finished."
            )
        self.continued, self.failed = run_id is not None, s.status == "failed"
        try:
            self.run = wandb.init(
                project=s.project,
                name=s.name,
                id=run_id or secrets.token_hex(4),
                resume=("must" if s.mode == "report" else "allow") if run_id else None,
                dir=str(s.run_dir),
                config=s.config if run_id is None else None,  # a new run, also when a resumed run starts one
            )
        except wandb.errors.Error as e:  # not logged in, no connection, ...
            raise UserError(
                f"W&B could not start a run ({first_line(e)}); log in with `wandb login` (or set "
                "WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on disk for `wandb sync`."
            ) from e
        self.id = self.run.id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def images(self, step: int, images: dict[str, Path]) -> None:
        import wandb

        # a run continued online stands one past its last step: an earlier step would be dropped
        self.run.log({t: wandb.Image(str(p)) for t, p in images.items()}, step=max(step, self.run.step))

    def close(self, failed: bool | None) -> None:
        self.run.finish(exit_code=1 if (self.failed if failed is None else failed) else 0)


class MLflowTracker:
    """An MLflow run, through MLflow's client (no global active run); a resumed run continues it by its
    id. The store: MLFLOW_TRACKING_URI, or else a file store in <run dir>/mlruns, which needs no server
    (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true for a file store: set for this process unless set).
    Report mode only adds artifacts to the run of tracking.json: its status stays as it is."""

    purges = False

    def __init__(self, s: Start) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (s.run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # a file store (a path)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.id = s.ids.get("mlflow") if s.mode != "new" else None
        self.continued = self.id is not None
        if s.mode == "report" and self.id is None:
            raise UserError(f"{STATE} names no MLflow run.")
        try:
            self._start(s)
        except MlflowException as e:
            raise UserError(
                f"MLflow could not {'open' if s.mode == 'report' else 'start'} a run ({first_line(e)}); "
                "check MLFLOW_TRACKING_URI, or unset it to keep the run in the run directory's mlruns/."
            ) from e

    def _start(self, s: Start) -> None:
        from mlflow.entities import Param

        if self.id is not None:
            if s.mode == "resume":
                self.client.update_run(self.id, status="RUNNING")
            else:  # report mode: the run must be in this store
                self.client.get_run(self.id)
            return
        found = self.client.get_experiment_by_name(s.project)
        experiment = found.experiment_id if found else self.client.create_experiment(s.project)
        self.id = self.client.create_run(experiment, run_name=s.name).info.run_id
        params = [Param(_mlflow_key(k.replace("/", ".")), str(v)[:6000]) for k, v in leaves(s.config)]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.id, params=params[i : i + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.id, metrics=metrics[i : i + 1000])

    def images(self, step: int, images: dict[str, Path]) -> None:
        for path in images.values():
            self.client.log_artifact(self.id, str(path), "report")

    def close(self, failed: bool | None) -> None:
        if failed is not None:  # report mode: the client holds nothing open
            self.client.set_terminated(self.id, "FAILED" if failed else "FINISHED")


BACKENDS: dict[str, Callable[[Start], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MLflowTracker,
}
