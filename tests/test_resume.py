"""Training that survives: SIGKILL at random points (also mid-checkpoint-write), SIGTERM, NaN batches,
a full disk — and resuming is bitwise identical to never having stopped."""

import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL
from lipkit import checkpoint as ckpt
from lipkit.config import config_from_dict
from lipkit.errors import EXIT_PREEMPTED, UserError
from lipkit.train.launch import run_training
from lipkit.train.trainer import TrainingFault


def config(table: Path, out: Path, model: dict | None = None, **train) -> dict:
    """`model`: more model settings (e.g. a pretrained text tower) beside the tiny overrides."""
    return {
        "data": {"train": str(table)},
        "model": {"overrides": TINY_MODEL, **(model or {})},
        "tokenizer": {"vocab_size": 400},
        "train": {
            "output": str(out),
            "batch_size": 16,
            "epochs": 6,
            "warmup_steps": 3,
            "log_every": 1,
            "save_every": 2,
            "keep_last": 2,
            "precision": "fp32",
            "threads": 1,
            **train,
        },
    }


def start(cfg: dict, tmp: Path, prelude: str = "") -> subprocess.Popen:
    path = tmp / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    code = (
        f"{prelude}\nimport json, sys\nfrom lipkit.config import config_from_dict\n"
        f"from lipkit.train.launch import run_training\n"
        f"_, r = run_training(config_from_dict(json.load(open({str(path)!r}))))\n"
        f"sys.exit({EXIT_PREEMPTED} if r.interrupted else 0)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if metrics.is_file():
            text = metrics.read_text()
            steps = [int(m) for m in re.findall(r'"step": (\d+)', text)]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def killed_and_resumed_objective_states(
    table: Path, tmp: Path, model: dict | None = None, **train
) -> tuple[dict, dict]:
    """A run straight through and one SIGKILLed after step 9 and resumed: asserts they end with the same
    weights and newest checkpoint step, and returns each one's objective state from that checkpoint."""
    ref = tmp / "ref"
    proc = start(config(table, ref, model, **train), tmp)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    out = tmp / "run"
    cfg = config(table, out, model, resume="auto", **train)
    proc = start(cfg, tmp)
    wait_for_step(proc, out / "metrics.jsonl", 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start(cfg, tmp)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    assert_same(weights(out), weights(ref))
    states = [sorted((run / "checkpoints").glob("step-*"))[-1] for run in (ref, out)]
    assert states[0].name == states[1].name
    saved = [
        {k: v for k, v in load_file(str(next(s.glob("train*.safetensors")))).items() if "objective." in k}
        for s in states
    ]
    return saved[0], saved[1]


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "run"
    run_training(config_from_dict(config(table, out)))
    return weights(out)


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(table, reference, tmp_path):
    out = tmp_path / "run"
    cfg = config(table, out, resume="auto")
    rng = random.Random(0)
    for _ in range(3):
        proc = start(cfg, tmp_path)
        wait_for_step(proc, out / "metrics.jsonl", rng.randint(2, 20))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Once more, killed in the middle of writing a checkpoint (half a safetensors file on disk).
    prelude = (
        "import os, signal, lipkit.checkpoint as c\n"
        "def half(tensors, path, metadata=None):\n"
        "    open(path, 'wb').write(b'partial' * 100)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.save_file = half\n"
    )
    proc = start(cfg, tmp_path, prelude)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list((out / "checkpoints").glob(".step-*.tmp-*")), "the kill should leave a half-written temp dir"
    proc = start(cfg, tmp_path)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    assert_same(weights(out), reference)
    assert not list((out / "checkpoints").glob(".step-*.tmp-*"))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1)), "the log reads as one run: every step once, in order"


def test_sigterm_checkpoints_and_exits_75_then_resume_is_exact(table, reference, tmp_path):
    out = tmp_path / "run"
    cfg = config(table, out, resume="auto", save_every=0)
    proc = start(cfg, tmp_path)
    wait_for_step(proc, out / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and ckpt.verify_checkpoint(saved[0])
    assert not (out / "checkpoint").exists()  # no final model: the run is not finished
    proc = start(cfg, tmp_path)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    assert_same(weights(out), reference)


def test_damaged_newest_checkpoint_is_skipped(table, tmp_path):
    out = tmp_path / "run"
    run_training(config_from_dict(config(table, out, epochs=2, keep_last=3)))
    newest = sorted((out / "checkpoints").iterdir())[-1]
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        found = ckpt.find_resume(out / "checkpoints")
    assert found is not None and found < newest


def test_nan_batches_are_skipped_and_counted_then_stop_with_a_clear_message(table, tmp_path, monkeypatch):
    from lipkit.objectives.infonce import InfoNCE

    calls = {"n": 0}
    real = InfoNCE.forward

    def flaky(self, **kw):
        calls["n"] += 1
        loss = real(self, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(InfoNCE, "forward", flaky)
    out = tmp_path / "run"
    _, result = run_training(config_from_dict(config(table, out, epochs=2)))
    assert result.faults == 1 and not result.interrupted
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    faults = [x for x in lines if x["kind"] == "fault"]
    assert len(faults) == 1 and faults[0]["step"] == 3 and faults[0]["keys"]
    assert all(torch.isfinite(v).all() for v in weights(out).values())

    monkeypatch.setattr(InfoNCE, "forward", lambda self, **kw: real(self, **kw) * float("nan"))
    with pytest.raises(
        TrainingFault, match=r"Step 3: 3 non-finite .* last good checkpoint is .*step-00000002"
    ):
        run_training(config_from_dict(config(table, tmp_path / "run2", epochs=2)))


def test_full_disk_stops_with_a_clear_message_and_keeps_the_previous_checkpoint(table, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ckpt.save_file
    calls = {"n": 0}

    def disk_full_on_second_checkpoint(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # model + trainer state of the first checkpoint succeed
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", disk_full_on_second_checkpoint)
    with pytest.raises(UserError, match="No space left on device.*free disk space"):
        run_training(config_from_dict(config(table, out, epochs=2)))
    saved = [p for p in (out / "checkpoints").iterdir()]
    assert [p.name for p in saved] == ["step-00000002"] and ckpt.verify_checkpoint(saved[0])


def test_unwritable_output_is_refused_before_training(table, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        out = blocker / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        out = ro / "run"
    with pytest.raises(UserError, match="not writable"):
        run_training(config_from_dict(config(table, out)))


def test_a_run_saved_before_the_groupnorm_stem_resumes_with_its_batch_norm(table, tmp_path):
    """A conv-stem run whose checkpoints predate `stem_norm` (BatchNorm, no such key in config.json)
    resumes with the model it saved, not with today's default GroupNorm stem."""
    conv = {**TINY_MODEL, "vision_stem": "conv"}
    first = config(table, tmp_path / "run", epochs=1)
    first["model"]["overrides"] = {**conv, "stem_norm": "batch"}
    run_training(config_from_dict(first))
    for cfg_file in (tmp_path / "run").glob("checkpoints/step-*/config.json"):
        saved = json.loads(cfg_file.read_text())
        del saved["model"]["stem_norm"]  # as written before the setting existed
        cfg_file.write_text(json.dumps(saved))
        manifest = json.loads((cfg_file.parent / "manifest.json").read_text())
        manifest["files"]["config.json"] = hashlib.sha256(cfg_file.read_bytes()).hexdigest()
        (cfg_file.parent / "manifest.json").write_text(json.dumps(manifest))
    again = config(table, tmp_path / "run", epochs=2, resume="auto")
    again["model"]["overrides"] = conv  # today's default: GroupNorm
    _, result = run_training(config_from_dict(again))
    final = ckpt.load_checkpoint(tmp_path / "run" / "checkpoint")[0]
    assert result.steps > 0 and final.spec.stem_norm == "batch"


def test_resuming_with_other_objective_settings_is_one_sentence(table, tmp_path):
    """A training state whose optimizer groups or objective state do not fit the run (here an objective with
    parameters of its own, SimSiam's predictor, resumed from a plain InfoNCE run) is refused in one sentence."""
    out = tmp_path / "run"
    run_training(config_from_dict(config(table, out, epochs=1)))
    other = config(
        table,
        out,
        epochs=2,
        resume="auto",
        objective="improved_baselines",
        objective_args={"image_ssl": "simsiam"},
    )
    with pytest.raises(UserError, match="does not fit this run's model and objective"):
        run_training(config_from_dict(other))
