"""Experiment tracking (`train.report_to`): TensorBoard, W&B (offline) and MLflow (a local file store) get
exactly the lines of metrics.jsonl, with their steps; a resumed run continues the same tracker runs and
step axis (no step twice, none going back); a fresh run into the same directory starts new ones; the
report's images follow; a missing library is a one-sentence UserError before training."""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from lipkit.config import config_from_dict
from lipkit.errors import UserError
from lipkit.train import tracking
from lipkit.train.launch import run_training
from lipkit.train.trainer import Trainer

pytest.importorskip("tensorboard")
Series = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)]


def config(table: Path, out: Path, report_to: list[str], **train):
    return config_from_dict(
        {
            "data": {"train": str(table), "eval": {"val": str(table)}},
            "model": {"overrides": TINY_MODEL},
            "tokenizer": {"vocab_size": 400},
            "eval": {"max_images": 32},
            "train": {
                "output": str(out),
                "report_to": report_to,
                "batch_size": 16,
                "epochs": 2,
                "warmup_steps": 2,
                "log_every": 1,
                "eval_every": 4,
                "save_every": 3,
                "precision": "fp32",
                "threads": 1,
                **train,
            },
        }
    )


class Killed(Exception):
    """Stands for a kill in the middle of training."""


def train_killed_then_resumed(table: Path, out: Path, report_to: list[str], monkeypatch, at: int = 8):
    """Train, die before optimiser step `at` (checkpoints every 3 steps: resumes from the last multiple
    of 3 below it, with the lines of the steps after it already sent), then resume to the end."""
    real, calls = Trainer.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(Killed):
        run_training(config(table, out, report_to, resume="auto"))
    monkeypatch.setattr(Trainer, "step", real)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == at - 1
    run_training(config(table, out, report_to, resume="auto"))


def from_jsonl(run: Path) -> Series:
    out: Series = defaultdict(list)
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for tag, value in tracking.scalars(record).items():
            out[tag].append((record["step"], value))
    return dict(out)


def from_tensorboard(run: Path) -> tuple[Series, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["images"]


def assert_same(got: Series, want: Series, rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        for (_, a), (_, b) in zip(got[tag], want[tag], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-7), tag


def increasing(series: Series) -> bool:
    """Every tag's steps go up: none twice, none going back."""
    return all(a[0] < b[0] for points in series.values() for a, b in zip(points, points[1:], strict=False))


def test_scalars_of_each_kind_of_line():
    assert tracking.scalars(
        {"kind": "train", "step": 3, "loss": 1.5, "lr": 1e-3, "faults": 0, "note": "x", "keys": ["a"]}
    ) == {"train/loss": 1.5, "train/lr": 1e-3, "train/faults": 0.0}
    assert tracking.scalars(
        {
            "kind": "eval",
            "step": 4,
            "split": "test-style",
            "metrics": {"zeroshot/category/top1": 0.5, "i2t/R@1": 0.25},
        }
    ) == {"eval/test-style/zeroshot/category/top1": 0.5, "eval/test-style/i2t/R@1": 0.25}
    assert tracking.scalars(
        {"kind": "data", "step": 2, "epoch": 0, "seen": 9, "skipped": {"unreadable": 1}, "skipped_total": {}}
    ) == {"data/epoch": 0.0, "data/seen": 9.0, "data/skipped/unreadable": 1.0}
    assert tracking.scalars({"kind": "fault", "step": 5, "loss": float("nan"), "keys": ["k"]}).keys() == {
        "fault/loss"
    }


def test_only_the_main_rank_starts_tracker_runs(table, tmp_path):
    with tracking.open_trackers(config(table, tmp_path, ["tensorboard"]), tmp_path, None, False) as trackers:
        trackers({"kind": "train", "step": 1, "loss": 1.0})
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "tracking.json").exists()


def test_tensorboard_reads_exactly_what_metrics_jsonl_holds_and_the_report_images(table, tmp_path):
    out = tmp_path / "run"
    run_training(config(table, out, ["tensorboard"], seed=1))  # an earlier run in the same directory
    run_training(config(table, out, ["tensorboard"]))  # a fresh run: a new TensorBoard run
    want = from_jsonl(out)
    assert "train/loss" in want and any(t.startswith("eval/val/") for t in want)
    got, images = from_tensorboard(out)
    assert_same(got, want)
    assert images == []

    from lipkit.eval.report import write_report

    index = write_report(out)
    assert tracking.log_report(out, index.parent) == []
    got, images = from_tensorboard(out)
    assert_same(got, want)  # the images added nothing to the scalars
    assert "report/training" in images


def test_tensorboard_after_a_kill_and_resume_has_every_step_once(table, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_killed_then_resumed(table, out, ["tensorboard"], monkeypatch)
    want = from_jsonl(out)
    steps = [s for s, _ in want["train/loss"]]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 8
    got, _ = from_tensorboard(out)
    assert_same(got, want)  # the step 7 of the killed run purged, logged again by the resumed one
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


# -- W&B, offline, with no connection leaving the machine --------------------------------------------------

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Connections to anything but loopback (W&B's local service may use it) fail and are recorded."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    attempts: list = []
    real_connect, real_connect_ex, real_create = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.create_connection,
    )

    def allowed(family, address) -> bool:
        if family not in (socket.AF_INET, socket.AF_INET6) or address[0] in LOOPBACK:
            return True
        attempts.append(address)
        return False

    def connect(self, address):
        if not allowed(self.family, address):
            raise OSError(101, "Network is unreachable (blocked by the test)")
        return real_connect(self, address)

    def connect_ex(self, address):
        return real_connect_ex(self, address) if allowed(self.family, address) else 101

    def create_connection(address, *args, **kwargs):
        if not allowed(socket.AF_INET, address):
            raise OSError(101, "Network is unreachable (blocked by the test)")
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, size, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the end of a block: padding
            pos += left
            continue
        chunks, pos = chunks + data[pos + 7 : pos + 7 + size], pos + 7 + size
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def finished_records(file: Path, timeout: float = 30) -> list:
    """A .wandb file's records once it ends with the run's exit (W&B's service may still be writing)."""
    end = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(file)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except Exception:  # a record half written
            if time.monotonic() > end:
                raise
        if time.monotonic() > end:
            return records
        time.sleep(0.1)


def wandb_runs(run: Path) -> list[tuple[str, Series]]:
    """Each offline run folder's (run id, scalars), oldest first."""
    runs = []
    for folder in (run / "wandb").glob("offline-run-*"):
        (file,) = folder.glob("run-*.wandb")
        records = finished_records(file)
        run_id, series, first = "", defaultdict(list), math.inf
        for r in records:
            if r.WhichOneof("record_type") == "run":
                run_id = r.run.run_id
            elif r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                first = min(first, row["_timestamp"])
                for key, value in row.items():
                    if not key.startswith("_"):
                        series[key].append((r.history.step.num, value))
        runs.append((first, run_id, dict(series)))
    return [(run_id, series) for _, run_id, series in sorted(runs, key=lambda x: x[0])]


def without_timing(series: Series) -> Series:
    """All but the wall-clock numbers, which differ between the killed run and its resumption."""
    return {t: v for t, v in series.items() if not t.endswith(("/time_s", "/samples_per_s"))}


def test_wandb_offline_gets_the_scalars_and_a_resume_continues_the_same_run(
    table, tmp_path, monkeypatch, no_network
):
    pytest.importorskip("wandb").teardown()  # W&B reads its environment (offline) once a process
    out = tmp_path / "run"
    train_killed_then_resumed(table, out, ["wandb"], monkeypatch)
    runs = wandb_runs(out)
    assert len(runs) == 2  # offline, a resumed run writes a second folder for the same run
    run_id = json.loads((out / "tracking.json").read_text())["ids"]["wandb"]
    assert [r for r, _ in runs] == [run_id, run_id]
    merged: Series = defaultdict(list)
    for _, series in runs:
        for tag, points in series.items():
            merged[tag] += [(s, v if v != "NaN" else math.nan) for s, v in points]
    assert increasing(merged)  # across the two processes: no step twice, none going back
    assert_same(without_timing(dict(merged)), without_timing(from_jsonl(out)))

    from lipkit.eval.report import write_report

    assert tracking.log_report(out, write_report(out).parent) == []
    run_id_of_images, images = wandb_runs(out)[-1]
    assert run_id_of_images == run_id and images["report/training/_type"] == [(16, "image-file")]
    assert no_network == []

    run_training(config(table, out, ["wandb"]))  # a fresh run into the same directory: a new W&B run
    new_id = json.loads((out / "tracking.json").read_text())["ids"]["wandb"]
    assert new_id != run_id and wandb_runs(out)[-1][0] == new_id
    assert no_network == []


def test_mlflow_local_store_gets_the_metrics_and_a_resume_reuses_the_run(
    table, tmp_path, monkeypatch, no_network
):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # restored after the test (lipkit sets it)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    train_killed_then_resumed(table, out, ["mlflow"], monkeypatch)
    run_id = json.loads((out / "tracking.json").read_text())["ids"]["mlflow"]
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lipkit"]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    want = without_timing(from_jsonl(out))
    got = {}
    for tag in want:
        history = client.get_metric_history(run_id, tag.replace("@", "_"))
        got[tag] = sorted((m.step, m.value) for m in history)
    assert increasing(got)
    assert_same(got, want)
    assert client.get_run(run_id).data.params["train.report_to"] == "['mlflow']"

    from lipkit.eval.report import write_report

    tracking.log_report(out, write_report(out).parent)
    assert "report/training.png" in [a.path for a in client.list_artifacts(run_id, "report")]

    run_training(config(table, out, ["mlflow"]))  # a fresh run: a new MLflow run beside the first
    new_id = json.loads((out / "tracking.json").read_text())["ids"]["mlflow"]
    assert new_id != run_id and len(client.search_runs([experiment.experiment_id])) == 2
    assert no_network == []


def test_wandb_without_a_login_is_one_sentence_naming_the_fixes(tmp_path, monkeypatch, no_network):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()  # W&B reads its environment once a process: an earlier test's offline mode goes
    trackers = tracking.Trackers(["tensorboard", "wandb"], tracking.Start(tmp_path, "run", "lipkit"))
    try:
        with pytest.raises(UserError, match=r"W&B could not start a run .*wandb login.*WANDB_MODE=offline"):
            trackers.__enter__()
    finally:
        trackers.close(failed=True)
        wandb.teardown()
    assert trackers.open == []  # the TensorBoard writer started before it is closed again
    assert no_network == []


# -- a library that is not installed -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_library_is_one_sentence_naming_the_extra_before_training(
    table, tmp_path, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if it were not installed
    out = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        run_training(config(table, out, ["tensorboard", name] if name != "tensorboard" else [name]))
    message = str(caught.value)
    assert f"pip install 'lipkit[{name}]'" in message and f"train.report_to includes {name}" in message
    assert message.endswith(".") and ". " not in message and "\n" not in message
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert not (out / "tracking.json").exists()


def test_an_unknown_tracker_is_refused_by_the_config(table, tmp_path):
    with pytest.raises(UserError, match="train.report_to lists only tensorboard, wandb or mlflow"):
        config(table, tmp_path, ["comet"])


def test_duplicate_trackers_are_refused_by_the_config(table, tmp_path):
    with pytest.raises(UserError, match="train.report_to names each tracker once"):
        config(table, tmp_path, ["tensorboard", "wandb", "tensorboard"])


def test_the_optional_import_helper_keeps_both_messages():
    from lipkit.interop.peer_weights import require

    with pytest.raises(UserError) as caught:
        require("lipkit_no_such_module", "ONNX export")
    assert str(caught.value) == (
        "ONNX export needs the 'lipkit_no_such_module' package, which is not installed; run "
        "pip install 'lipkit[interop]'."
    )
    with pytest.raises(
        UserError, match=r"train.report_to includes lipkit_no_such_module, but .* pip install"
    ):
        tracking.require("lipkit_no_such_module")


# -- resuming twice, and resuming behind what was sent --------------------------------------------------


def killed_at(monkeypatch, at: int):
    """Trainer.step raises Killed at its `at`-th call in this process; returns the undo."""
    real, calls = Trainer.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)
    return lambda: monkeypatch.setattr(Trainer, "step", real)


def test_a_second_crash_before_the_first_ones_last_step_sends_no_step_twice(
    table, tmp_path, monkeypatch, no_network, capsys
):
    """Process 1 sends steps 1..7 and dies (checkpoint 6); process 2 cuts metrics.jsonl back to 6 and
    dies before step 7; process 3 must not send step 7 again (MLflow would keep two values)."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    for at in (8, 1):
        undo = killed_at(monkeypatch, at)
        with pytest.raises(Killed):
            run_training(config(table, out, ["mlflow"], resume="auto"))
        undo()
    assert tracking.last_step(out / "metrics.jsonl") == 6
    state = json.loads((out / "tracking.json").read_text())
    assert state["sent"] == {"mlflow": 7} and state["status"] == "failed"
    capsys.readouterr()
    run_training(config(table, out, ["mlflow"], resume="auto"))
    assert "resuming after step 6: in mlflow, steps 7..7 keep the values an earlier process sent" in (
        capsys.readouterr().err
    )
    run_id = json.loads((out / "tracking.json").read_text())["ids"]["mlflow"]
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    want = without_timing(from_jsonl(out))
    history = {t: client.get_metric_history(run_id, t.replace("@", "_")) for t in want}
    got = {t: sorted((m.step, m.value) for m in points) for t, points in history.items()}
    assert increasing(got)  # step 7 once
    assert_same(got, want)
    assert json.loads((out / "tracking.json").read_text())["status"] == "finished"


# -- the report: the runs' status stays, errors are notes ------------------------------------------------


def test_the_report_leaves_a_failed_mlflow_run_failed_and_a_missing_run_is_a_note(
    table, tmp_path, monkeypatch, no_network
):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    from mlflow.tracking import MlflowClient

    from lipkit.eval.report import write_report

    out = tmp_path / "run"
    undo = killed_at(monkeypatch, 5)
    with pytest.raises(Killed):
        run_training(config(table, out, ["mlflow"]))
    undo()
    run_id = json.loads((out / "tracking.json").read_text())["ids"]["mlflow"]
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    assert client.get_run(run_id).info.status == "FAILED"
    index = write_report(out)
    assert tracking.log_report(out, index.parent) == []
    assert client.get_run(run_id).info.status == "FAILED"  # not FINISHED by the report
    assert "report/training.png" in [a.path for a in client.list_artifacts(run_id, "report")]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "other-store").resolve().as_uri())
    (note,) = tracking.log_report(out, index.parent)  # the run is not in that store
    assert note.startswith("The report's images were not sent to mlflow: MLflow could not open a run")


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.kwargs, self.id, self.step, self.logged, self.exit_codes = kwargs, kwargs["id"], 0, [], []

    def log(self, values, step):
        self.logged.append(step)

    def finish(self, exit_code):
        self.exit_codes.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.init records its arguments and returns a FakeWandbRun."""
    wandb = pytest.importorskip("wandb")
    runs: list[FakeWandbRun] = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    monkeypatch.setattr(wandb, "Image", str)
    return runs


def test_wandb_gets_the_config_whenever_a_run_is_created(tmp_path, fake_wandb):
    cfg = {"train": {"lr": 0.1}}
    tracking.BACKENDS["wandb"](tracking.Start(tmp_path, "r", "p", "resume", {}, 3, cfg))  # no stored run
    tracking.BACKENDS["wandb"](tracking.Start(tmp_path, "r", "p", "resume", {"wandb": "abc"}, 3, cfg))
    assert [(r.kwargs["config"], r.kwargs["resume"]) for r in fake_wandb] == [(cfg, None), (None, "allow")]
    assert fake_wandb[1].id == "abc"


def test_the_report_reopens_only_a_wandb_run_that_ended_and_ends_it_as_it_was(tmp_path, fake_wandb):
    png = tmp_path / "report" / "training.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    state = {"report_to": ["wandb"], "name": "r", "project": "p", "ids": {"wandb": "abc"}}
    notes = {}
    for status in ("finished", "failed", "running"):
        (tmp_path / "tracking.json").write_text(json.dumps({**state, "status": status}))
        notes[status] = tracking.log_report(tmp_path, png.parent)
    assert notes["finished"] == notes["failed"] == []
    assert [(r.kwargs["resume"], r.kwargs["config"], r.exit_codes) for r in fake_wandb] == [
        ("must", None, [0]),
        ("must", None, [1]),  # a failed run stays failed
    ]
    (note,) = notes["running"]  # still training, or killed: not reopened
    assert note.startswith("The report's images were not sent to wandb: its W&B run has not ended")


def test_the_report_without_a_wandb_login_is_a_note(tmp_path, monkeypatch, no_network):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    png = tmp_path / "report" / "training.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    state = {
        "report_to": ["wandb"],
        "name": "r",
        "project": "p",
        "ids": {"wandb": "abc"},
        "status": "finished",
    }
    (tmp_path / "tracking.json").write_text(json.dumps(state))
    try:
        (note,) = tracking.log_report(tmp_path, png.parent)
    finally:
        wandb.teardown()
    assert note.startswith("The report's images were not sent to wandb: W&B could not start a run")
    assert no_network == []


def test_report_to_trackers_turns_any_error_into_a_note(tmp_path, monkeypatch, capsys):
    from lipkit.cli.common import report_to_trackers

    def broken(*_):
        raise RuntimeError("tracking.json is odd")

    monkeypatch.setattr(tracking, "log_report", broken)
    report_to_trackers(tmp_path, tmp_path / "report" / "index.html")
    err = " ".join(capsys.readouterr().err.split())  # as one line (rich wraps it)
    assert "not sent to the experiment trackers (RuntimeError: tracking.json is odd)" in err


def test_a_fresh_run_removes_the_tracking_json_of_the_run_before(table, tmp_path):
    (tmp_path / "tracking.json").write_text('{"report_to": ["wandb"], "ids": {"wandb": "old"}}')
    tracking.open_trackers(config(table, tmp_path, []), tmp_path, None, main=False)
    assert (tmp_path / "tracking.json").exists()  # only the main rank removes it
    tracking.open_trackers(config(table, tmp_path, []), tmp_path, None, main=True)
    assert not (tmp_path / "tracking.json").exists()


# -- a tracker that fails: a warning, never a crash -------------------------------------------------------


class FakeTracker:
    continued, purges, id = False, True, None
    fail_on: set[str] = set()  # the calls that raise

    def __init__(self, s):
        self.calls = []
        FAKES.append(self)

    def _do(self, call, *args):
        self.calls.append((call, *args))
        if call in self.fail_on:
            raise RuntimeError(f"{call} failed\nsecond line")

    def scalars(self, step, values):
        self._do("scalars", step)

    def images(self, step, images):
        self._do("images", step)

    def close(self, failed):
        self._do("close", failed)


class FailingTracker(FakeTracker):
    fail_on = {"scalars", "close"}


FAKES: list[FakeTracker] = []


@pytest.fixture
def fakes(monkeypatch):
    FAKES.clear()
    monkeypatch.setitem(tracking.BACKENDS, "good", FakeTracker)
    monkeypatch.setitem(tracking.BACKENDS, "bad", FailingTracker)
    return FAKES


def test_a_tracker_that_fails_is_one_warning_and_left_out(tmp_path, fakes, capsys):
    trackers = tracking.Trackers(["bad", "good"], tracking.Start(tmp_path, "r", "p"))
    with trackers:
        for step in (1, 2):
            trackers({"kind": "train", "step": step, "loss": 1.0})
    bad, good = fakes
    assert good.calls == [("scalars", 1), ("scalars", 2), ("close", False)]
    assert bad.calls == [("scalars", 1), ("close", False)]  # closed (quietly), nothing more sent
    err = capsys.readouterr().err
    assert err.count("experiment tracker bad failed (RuntimeError: scalars failed.)") == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert json.loads((tmp_path / "tracking.json").read_text())["status"] == "finished"


def test_closing_never_hides_the_error_that_ended_training(tmp_path, fakes, capsys):
    trackers = tracking.Trackers(["bad", "good"], tracking.Start(tmp_path, "r", "p"))
    with pytest.raises(ValueError, match="the training error"), trackers:
        raise ValueError("the training error")
    assert [f.calls for f in fakes] == [[("close", True)], [("close", True)]]
    assert "experiment tracker bad could not finish its run" in capsys.readouterr().err
    assert json.loads((tmp_path / "tracking.json").read_text())["status"] == "failed"


def test_training_goes_on_when_a_tracker_fails(table, tmp_path, fakes, monkeypatch, capsys):
    monkeypatch.setitem(tracking.BACKENDS, "tensorboard", FailingTracker)
    run_dir, result = run_training(config(table, tmp_path / "run", ["tensorboard"], epochs=1))
    assert result.steps > 1 and (run_dir / "checkpoint").is_dir()
    (bad,) = fakes
    assert [c for c, *_ in bad.calls] == ["scalars", "close"]
    assert capsys.readouterr().err.count("experiment tracker tensorboard failed") == 1


# -- starting early, and on every rank ----------------------------------------------------------------------


def test_a_wandb_login_failure_stops_the_run_before_the_model_is_built(
    table, tmp_path, monkeypatch, no_network
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()

    def not_reached(*_):
        raise AssertionError("the model was built")

    monkeypatch.setattr("lipkit.train.launch._build_model", not_reached)
    try:
        with pytest.raises(UserError, match="W&B could not start a run"):
            run_training(config(table, tmp_path / "run", ["wandb"]))
    finally:
        wandb.teardown()
    assert no_network == []


def test_every_rank_learns_whether_rank_0_started_its_trackers(tmp_path, fakes, monkeypatch):
    class CannotStart(FakeTracker):
        def __init__(self, s):
            raise UserError("W&B could not start a run.")

    monkeypatch.setitem(tracking.BACKENDS, "bad", CannotStart)
    gathered = []

    def gather(flag):
        gathered.append(flag)
        return [False, True] if flag else [False]  # rank 0 failed; this rank (1) is fine

    monkeypatch.setattr(tracking, "gather_objects", gather)
    start = tracking.Start(tmp_path, "r", "p")
    with pytest.raises(UserError, match="W&B could not start a run"):  # rank 0: its own error, once all know
        tracking.Trackers(["good", "bad"], start, distributed=True).__enter__()
    assert gathered == [False] and fakes[0].calls == [("close", True)]
    with pytest.raises(UserError, match="Rank 0 could not start the trackers"):  # rank 1: stops too
        tracking.Trackers([], start, distributed=True).__enter__()
    assert gathered == [False, True]
