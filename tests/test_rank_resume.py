"""Two gloo ranks through the real launch path (`run_training`, as torchrun starts it): stopped by a
signal on one rank after step 3, the run writes one checkpoint holding every rank's data position and
skip counts, and resumes bitwise identical to the run that never stopped (weights, and the data state of
its last checkpoint) — from a table streamed without the image cache (unusable rows replaced by slot)
and from WebDataset shards. That each rank reads only its share is tested in test_table_ranks.py and
test_shard_ranks.py."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import TINY_MODEL, free_port
from lipkit.config import config_from_dict
from lipkit.data.convert import convert
from lipkit.train.trainer import Trainer


def config(train: str, out: Path, **data) -> dict:
    return {
        "data": {"train": train, "cache_images": False, "max_skip_fraction": 0.2, **data},
        "model": {"overrides": TINY_MODEL},
        "tokenizer": {"vocab_size": 400},
        "train": {
            "output": str(out),
            "batch_size": 16,
            "epochs": 2,
            "warmup_steps": 2,
            "log_every": 1,
            "precision": "fp32",
            "threads": 1,
        },
    }


def _rank(rank: int, world: int, port: int, cfg: dict, stop_after: int, errors: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    from lipkit.train.launch import run_training

    if stop_after and rank == 1:  # a SIGTERM seen by rank 1 alone, after its `stop_after`-th step
        real, calls = Trainer.step, []

        def step(self, *args, **kw):
            calls.append(1)
            if len(calls) == stop_after:
                self.preemption.pending = 15
            return real(self, *args, **kw)

        Trainer.step = step
    try:
        run_training(config_from_dict(cfg))
    except BaseException:
        Path(errors, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def two_ranks(cfg: dict, tmp: Path, stop_after: int = 0) -> None:
    try:
        mp.spawn(_rank, args=(2, free_port(), cfg, stop_after, str(tmp)), nprocs=2, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in sorted(tmp.glob("rank*.error")))
        pytest.fail(f"a rank failed:\n{errors}")


@pytest.fixture(scope="module")
def sources(table: Path, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("rank-resume")
    rows = [json.loads(x) for x in table.read_text().splitlines() if x.strip()]
    for i in (2, 9, 17):  # rows found unusable only while streaming
        rows[i]["image"] = "missing.png"
    broken = tmp / "table.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:  # the shards hold the table's images (relative paths resolve from its folder)
        r["image"] = str(table.parent / r["image"]) if r["image"] != "missing.png" else r["image"]
    (tmp / "abs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["image"] != "missing.png"))
    convert(tmp / "abs.jsonl", tmp / "shards", shard_size=12, progress=False)
    return {"table": str(broken), "shards": str(tmp / "shards")}


@pytest.mark.parametrize("kind", ["table", "shards"])
def test_two_ranks_resume_bitwise_from_the_merged_data_position(sources, tmp_path, kind, table):
    # the table's images sit beside the fixture table
    extra = {"image_root": str(table.parent)} if kind == "table" else {"shuffle_buffer": 8}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    two_ranks(config(sources[kind], whole, **extra), tmp_path)
    two_ranks(config(sources[kind], parts, **extra), tmp_path, stop_after=3)
    saved = sorted((parts / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000003"]  # the preemption checkpoint
    data = json.loads((saved[0] / "trainer_state.json").read_text())["data"]
    if kind == "table":
        assert data["batch"] == 3 and len(data["ranks"]) == 2
    else:
        assert data["batch"] == 3 and sorted(data["start"]) == ["0", "1"]  # each rank's stream
    resumed = config(sources[kind], parts, **extra)
    resumed["train"]["resume"] = "auto"
    two_ranks(resumed, tmp_path)
    a = load_file(str(whole / "checkpoint" / "model.safetensors"))
    b = load_file(str(parts / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last resumable checkpoints hold the same data state: each rank's position and skip counts
    # (for a table, the rows replaced by substitutes; the merged state handed every rank its own back)
    last = [sorted((run / "checkpoints").glob("step-*"))[-1] for run in (whole, parts)]
    states = [json.loads((p / "trainer_state.json").read_text())["data"] for p in last]
    assert states[0] == states[1]
    if kind == "table":
        assert sum(states[0]["skipped_total"].values()) > 0 and len(states[0]["ranks"]) == 2
    logged = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in logged if x["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] > 3  # one step axis, nothing rewound or repeated
