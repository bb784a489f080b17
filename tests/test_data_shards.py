"""Training from every format: the same samples per epoch; WebDataset shards streamed in worker
processes resume exactly after a SIGKILL; broken shards and images are skipped, counted and logged,
and too many of them stop the run with one clear sentence; the `lipkit data` commands."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lipkit.checkpoint import find_resume
from lipkit.cli import app
from lipkit.config import config_from_dict
from lipkit.data.convert import convert
from lipkit.errors import UserError
from lipkit.train.launch import run_training
from lipkit.train.trainer import Trainer

MODEL = {
    "vision_width": 16,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_width": 16,
    "text_layers": 1,
    "text_heads": 2,
    "embed_dim": 16,
    "image_size": 16,
}


@pytest.fixture(scope="module")
def formats(table, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("formats")
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    with (out / "train.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "captions", "label"])
        w.writerows([str(table.parent / r["image"]), json.dumps(r["captions"]), r["label"]] for r in rows)
    pq.write_table(
        pa.table(
            {
                "image": [(table.parent / r["image"]).read_bytes() for r in rows],
                "captions": [r["captions"] for r in rows],
                "key": [str(table.parent / r["image"]) for r in rows],
            }
        ),
        out / "train.parquet",
        row_group_size=50,
    )
    # 10 shards of 13: one stream, or two streams of 65 samples each, read exactly their share of an epoch
    # (streams over uneven shards repeat some samples, see data/shard_batches.py and test_shard_ranks.py)
    shards = convert(table, out / "shards", shard_size=13, progress=False).extra["pattern"]
    return {
        "jsonl": str(table),
        "csv": str(out / "train.csv"),
        "parquet": str(out / "train.parquet"),
        "shards": shards,
    }


def config(train: str, out: Path, data: dict | None = None, **train_kw) -> dict:
    return {
        "data": {"train": train, **(data or {})},
        "model": {"overrides": MODEL},
        "tokenizer": {"vocab_size": 300},
        "train": {
            "output": str(out),
            "batch_size": 10,
            "epochs": 2,
            "warmup_steps": 2,
            "log_every": 1,
            "precision": "fp32",
            "threads": 1,
            **train_kw,
        },
    }


@pytest.fixture()
def keylog(monkeypatch) -> list:
    seen: list = []
    real = Trainer.fit

    def fit(self, batches, *a, **k):
        def logged(epoch, first):
            for images, captions, keys in batches(epoch, first):
                seen.append([self.step_count + 1, epoch, list(keys), list(captions)])
                yield images, captions, keys

        return real(self, logged, *a, **k)

    monkeypatch.setattr(Trainer, "fit", fit)
    return seen


def per_epoch(log: list) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for _, epoch, keys, captions in log:
        out.setdefault(epoch, Counter()).update(zip(keys, captions, strict=True))
    return out


def test_same_samples_per_epoch_from_every_format(formats, keylog, tmp_path):
    seen = {}
    runs = [(name, src, {}) for name, src in formats.items()]
    runs.append(("shards-2-workers", formats["shards"], {"workers": 2, "shuffle_buffer": 8}))
    for name, src, data in runs:
        keylog.clear()
        _, result = run_training(config_from_dict(config(src, tmp_path / name, data)))
        assert result.steps == 26 and not result.interrupted
        seen[name] = per_epoch(keylog)
    reference = seen["jsonl"]
    assert set(reference) == {0, 1} and all(sum(c.values()) == 130 for c in reference.values())
    for name, epochs in seen.items():
        assert epochs == reference, name  # same (key, caption) multiset in every epoch


def test_meta_captions_reach_training_from_tables_and_shards(formats, keylog, tmp_path):
    """data.meta_captions: the caption made from the row's category is trained on, from a table and from
    shards alike (shards keep the row's columns in their .json)."""
    data = {"meta_captions": ["a {category} emoji"], "caption_select": [0], "caption_policy": "first"}
    seen = {}
    for name in ("jsonl", "shards"):
        keylog.clear()
        cfg = config(formats[name], tmp_path / name, {**data, "captions_per_image": 2}, epochs=1)
        run_training(config_from_dict({**cfg, "train": {**cfg["train"], "objective": "multi_positive"}}))
        pairs = Counter()
        for _, _, keys, captions in keylog:
            assert len(captions) == 2 * len(keys)  # image-major: label, then the meta caption
            pairs.update(zip(keys, captions[1::2], strict=True))
        assert all(c.startswith("a ") and c.endswith(" emoji") for _, c in pairs), name
        assert sum(pairs.values()) == 130, name
        seen[name] = pairs
    assert seen["jsonl"] == seen["shards"]


def test_meta_captions_that_fill_nothing_are_refused_for_tables_and_shards(formats, tmp_path):
    """A template naming a column the rows lack is one clear error before training, from shards too."""
    data = {"meta_captions": ["a {categroy} emoji"], "caption_select": [0]}
    for name in ("jsonl", "shards"):
        cfg = config_from_dict(config(formats[name], tmp_path / name, data, epochs=1))
        with pytest.raises(UserError, match=r"filled no caption in .*category"):
            run_training(cfg)


def _broken_shards(table: Path, root: Path) -> str:
    """Shards of the fixture with two truncated PNGs inside and the last shard cut short."""
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    (root / "img").mkdir(parents=True)
    for i in (3, 70):
        data = (table.parent / rows[i]["image"]).read_bytes()
        (root / "img" / f"cut{i}.png").write_bytes(data[: len(data) // 2])
        rows[i] = {**rows[i], "image": str(root / "img" / f"cut{i}.png")}
    for r in rows:
        r["image"] = str(table.parent / r["image"]) if not r["image"].startswith("/") else r["image"]
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pattern = convert(src, root / "shards", shard_size=16, progress=False).extra["pattern"]
    last = sorted((root / "shards").glob("*.tar"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # a truncated download
    return pattern


def test_sigkill_then_resume_continues_with_exactly_the_next_batch(table, keylog, tmp_path, capsys):
    shards = _broken_shards(table, tmp_path / "data")
    data = {"workers": 2, "shuffle_buffer": 8, "max_skip_fraction": 0.2}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "run"
    cfg = config(shards, out, data, epochs=2, save_every=3, batch_size=8, resume="auto")  # mid-epoch saves

    def start() -> subprocess.Popen:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        code = (
            "import json\nfrom lipkit.config import config_from_dict\nfrom lipkit.train.launch import run_training\n"
            f"run_training(config_from_dict(json.load(open({str(path)!r}))))\n"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def kill_at(proc: subprocess.Popen, step: int) -> None:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            if (out / "metrics.jsonl").is_file():  # lines may be half-written: look for step numbers only
                steps = re.findall(r'"step": (\d+)', (out / "metrics.jsonl").read_text())
                if max(map(int, steps), default=0) >= step:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)

    first = start()  # killed with SIGKILL part-way
    killer = threading.Thread(target=kill_at, args=(first, random.Random(0).randint(6, 24)))
    killer.start()
    ref_cfg = {**cfg, "train": {**cfg["train"], "output": str(tmp_path / "ref"), "resume": ""}}
    run_training(config_from_dict(ref_cfg))  # the uninterrupted run, in this process meanwhile
    killer.join()
    assert first.wait() == -signal.SIGKILL
    ref_steps = {s: (k, c) for s, _, k, c in keylog}
    per_epoch = max(ref_steps) // 2
    saved = json.loads((find_resume(out / "checkpoints") / "trainer_state.json").read_text())["data"]
    assert (
        saved["kind"] == "shards" and 0 < saved["batch"] < per_epoch and saved["start"]
    )  # a stream position
    keylog.clear()
    capsys.readouterr()
    run_training(config_from_dict(cfg))  # resume=auto, in this process
    assert "replaying" not in capsys.readouterr().out  # continued from the saved position
    after = list(keylog)
    first_step = after[0][0]
    assert first_step > 1 and first_step % 3 == 1, "resumed from a mid-run checkpoint"
    assert first_step - 1 == saved["epoch"] * per_epoch + saved["batch"]
    assert [s for s, *_ in after] == list(range(first_step, max(ref_steps) + 1))
    for s, _, keys, caps in after:
        assert (keys, caps) == ref_steps[s], f"step {s} differs from the uninterrupted run"
    a = load_file(str(out / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the skips were counted in both runs alike and logged as data lines
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    data_lines = [x for x in lines if x["kind"] == "data"]
    assert data_lines == [x for x in ref_lines if x["kind"] == "data"]
    final = data_lines[-1]["skipped_total"]
    assert final["corrupt_image"] >= 4 and final["truncated_shard"] >= 2  # 2 images, 1 shard, 2 epochs


def test_too_many_skips_stop_the_run_with_one_sentence(table, tmp_path):
    shards = _broken_shards(table, tmp_path / "data")
    with pytest.raises(UserError, match=r"Skipped \d+ of \d+ samples .* data.max_skip_fraction=0.01") as e:
        run_training(config_from_dict(config(shards, tmp_path / "run", {"workers": 2})))
    assert "\n" not in str(e.value)
    missing = str(tmp_path / "data" / "shards" / "{00000..00010}.tar")  # two shards do not exist
    _, result = run_training(
        config_from_dict(config(missing, tmp_path / "run2", {"max_skip_fraction": 0.5}, epochs=1))
    )
    lines = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if x["kind"] == "data"][-1]["skipped"]
    assert skipped["unreadable_shard"] >= 2 and skipped["corrupt_image"] >= 2 and result.steps > 0


def test_data_commands(formats, table, tmp_path):
    runner = CliRunner()
    out = tmp_path / "shards"
    r = runner.invoke(app, ["data", "convert", formats["csv"], str(out), "--shard-size", "50"])
    assert r.exit_code == 0, r.output
    assert "wrote 130 samples into 3 shards" in r.output and (out / "lipkit-counts.json").is_file()
    r = runner.invoke(app, ["data", "inspect", str(table), "--json"])
    report = json.loads(r.stdout)
    assert report["samples"] == 130 and report["image_shorter_side"] == {"64-127": 130}
    assert report["languages"]["en"] > 130 and report["caption_words"]
    r = runner.invoke(app, ["data", "inspect", str(out)])
    assert r.exit_code == 0 and "caption length (words)" in r.stdout
    r = runner.invoke(app, ["data", "validate", str(out / "{00000..00002}.tar")])
    assert r.exit_code == 0 and "130 samples OK, 0 broken" in r.output
    broken = _broken_shards(table, tmp_path / "broken")
    r = runner.invoke(app, ["data", "validate", broken, "--json"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["skipped"]["corrupt_image"] == 2 and report["skipped"]["truncated_shard"] >= 1
    r = runner.invoke(app, ["data", "validate", broken, "--workers", "2"])
    assert r.exit_code == 1 and "corrupt_image" in r.stdout and "truncated_shard" in r.stdout
