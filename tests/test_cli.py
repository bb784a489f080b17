"""The CLI end to end on the fixture dataset with a very small model: seconds, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from emoji_fixture import make_fixture_packages

TINY = [
    "model.overrides={vision_width: 32, vision_layers: 1, vision_heads: 2, text_width: 32, text_layers: 1,"
    " text_heads: 2, embed_dim: 32, image_size: 32, vision_stem: conv}",
    "tokenizer.vocab_size=400",
    "train.batch_size=32",
    "train.epochs=3",
    "train.warmup_steps=2",
    "train.eval_every=5",
    "train.log_every=2",
    "train.precision=fp32",
    "eval.batch_size=64",
]


def lipkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lipkit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An XDG cache dir whose npm folder already holds the (fake) packages: builds run offline."""
    root = tmp_path_factory.mktemp("cache")
    make_fixture_packages(root / "lipkit" / "npm", n_concepts=40)
    return root


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_demo_end_to_end(cache, tmp_path):
    out = tmp_path / "run"
    r = lipkit("demo", "--out", str(out), *sets(*TINY), env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (cache / "lipkit" / "datasets" / "emoji" / "summary.json").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "checkpoint" / name).is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert train and all(x["loss"] == x["loss"] for x in train)  # no NaN
    assert {x["split"] for x in evals} == {"test-style", "test-novel"}
    results = json.loads((out / "eval" / "results.json").read_text())
    m = results["splits"]["test-style"]["metrics"]
    assert {"zeroshot/subcategory/top1", "zeroshot/category/top5", "retrieval/text_to_image/R@10"} <= set(m)
    assert {"probe/subcategory/top1", "probe/category/top1"} <= set(m)  # the demo config's linear probe
    assert results["linear_probe"]["columns"]["category"]["classes"] >= 2
    html = (out / "report" / "index.html").read_text()
    assert "zeroshot/subcategory/top1" in html and "data:image/png;base64" in html
    assert "report:" in r.stderr

    # `lipkit eval` on the same checkpoint, at the demo config's eval precision (bf16 autocast), reproduces
    # the demo's numbers
    root = cache / "lipkit" / "datasets" / "emoji"
    r2 = lipkit(
        "eval",
        str(out / "checkpoint"),
        "--data",
        f"test-style={root / 'test-style.jsonl'}",
        "--set",
        "eval.precision=bf16",
        "--out",
        str(tmp_path / "again.json"),
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((tmp_path / "again.json").read_text())["splits"]["test-style"]["metrics"]
    assert not any(k.startswith("probe/") for k in again)  # no probe unless asked
    assert again == pytest.approx({k: v for k, v in m.items() if not k.startswith("probe/")}, abs=1e-6)
    assert "zeroshot/subcategory/top1" in r2.stdout


def test_train_learns_on_fixture(tmp_path):
    """Training from the YAML path: loss falls well below its start on an easy learnable dataset."""
    from lipkit.data.emoji import build_emoji

    make_fixture_packages(tmp_path / "packages", n_concepts=40)
    data = tmp_path / "emoji"
    build_emoji(data, cache_dir=tmp_path, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train: {data / 'train.jsonl'}\ntrain:\n  output: {tmp_path / 'run'}\n")
    r = lipkit("train", "--config", str(cfg), *sets(*TINY, "train.epochs=8", "train.lr=3e-3"))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_readme_pairs_csv_with_the_pairs_config(table, tmp_path):
    """The README's own-pairs example: a CSV of image, caption, label with configs/pairs.yaml (locked
    MiniLM) trains, then again with a label caption from the `label` column (multi-positive)."""
    import csv

    root = table.parent
    rows = [json.loads(x) for x in table.read_text().splitlines()][:48]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "captions", "label"])
        for r in rows:
            w.writerow([str(root / r["image"]), r["captions"][0], r["category"]])
    small = [TINY[0].replace(", text_width: 32, text_layers: 1, text_heads: 2", ""), *TINY[2:]]
    pairs_yaml = str(Path(__file__).resolve().parents[1] / "configs" / "pairs.yaml")
    base = ["--config", pairs_yaml, *sets(f"data.train={pairs}", *small, "train.batch_size=16")]
    r = lipkit("train", *base, *sets(f"train.output={tmp_path / 'a'}"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = lipkit(
        "train",
        *base,
        *sets(
            f"train.output={tmp_path / 'b'}",
            'data.meta_captions=["an emoji of {label}"]',
            "data.captions_per_image=2",
            "train.objective=multi_positive",
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "b" / "checkpoint" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--set", "train.lrr=1"], "Unknown config key 'train.lrr'; did you mean 'lr'"),
        (
            ["train", "--set", "data.train=/nonexistent/table.csv"],
            "Data table '/nonexistent/table.csv' does not exist",
        ),
        (["eval", "/nonexistent", "--data", "a=b.jsonl"], "is not a lipkit checkpoint"),
        (["train", "--config", "/nonexistent.yaml"], "Config file '/nonexistent.yaml' does not exist"),
    ],
)
def test_user_errors_are_one_clear_sentence(args, needle):
    r = lipkit(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_teaches():
    r = lipkit("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "report", "demo", "data"):
        assert cmd in r.stdout
    assert "--set" in lipkit("train", "--help").stdout
    assert lipkit("--version").stdout.startswith("lipkit ")


def test_torchrun_two_nodes_meet_through_the_c10d_rendezvous(tmp_path):
    """The SLURM recipe's launch (docs/scaling.md): one torchrun agent per node, here two on this
    machine, meet through `--rdzv-backend c10d` and train as one world of 2 gloo ranks."""
    from lipkit.data.emoji import build_emoji

    make_fixture_packages(tmp_path / "packages", n_concepts=40)
    data = tmp_path / "emoji"
    build_emoji(data, cache_dir=tmp_path, progress=False)
    port = free_port()
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lipkit-test",
        "--local-addr", "127.0.0.1",
        "-m", "lipkit", "train",
        *sets(*TINY, f"data.train={data / 'train.jsonl'}", f"train.output={run}", "train.epochs=1",
              "train.threads=1"),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, err[-3000:]
    banner = "".join(err for _, err in outs)
    assert "× 2 ranks (gloo, ddp)" in banner, banner[-3000:]
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in train if x["kind"] == "train"], "no training step was logged"
    assert (run / "checkpoint").exists()
