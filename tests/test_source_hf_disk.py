"""Hugging Face datasets saved with `save_to_disk` (written here by `datasets` itself) as a source: the
kind is found from the folder, the records are those of the same data as a JSONL table (keys, captions,
metadata with ClassLabel names, decoded pixels), images stay in the memory-mapped Arrow files as
picklable references, a DatasetDict is named by its split, and the source trains (rank-sharded, resumed
bitwise) and evaluates like any other. A classification set (an image and a ClassLabel, no captions)
reads as records without captions and is classified over every class of its ClassLabel."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import TINY_MODEL
from lipkit.config import DataConfig, EvalConfig, config_from_dict
from lipkit.data.label_sets import LabelSet
from lipkit.data.sources.hf_disk import ArrowRecord
from lipkit.data.sources.registry import (
    estimate_total,
    eval_labels,
    open_train_data,
    read_records,
    read_table,
    source_kind,
)
from lipkit.data.table_batches import ImageStore, TrainBatches
from lipkit.errors import UserError

datasets = pytest.importorskip("datasets")

SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
N = 24
NAMES = ["square", "hexagon", "circle", "triangle"]  # a ClassLabel in index order; no image is a hexagon


def draw(i: int) -> bytes:
    """A small PNG: shape i % 3 in colour i % 4 at a position that depends on i (every image differs)."""
    shape, rgb = SHAPES[i % 3], list(COLOURS.values())[i % 4]
    im = Image.new("RGB", (24, 20), (255, 255, 255))
    d = ImageDraw.Draw(im)
    box = (2 + i % 5, 2 + i % 3, 16 + i % 5, 16 + i % 3)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """N drawn PNGs as a JSONL table, the same rows as a Dataset saved in two Arrow files, and a
    DatasetDict (train: every row, test: the first 6)."""
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf-disk")
    (root / "img").mkdir()
    rows = []
    for i in range(N):
        (root / "img" / f"{i}.png").write_bytes(draw(i))
        colour, shape = list(COLOURS)[i % 4], SHAPES[i % 3]
        caps = [f"a {colour} {shape}", f"a {shape} in {colour}"][: 1 + i % 2]
        rows.append(
            {
                "image": f"img/{i}.png",
                "captions": caps,
                "category": shape,
                "category_index": i % 3,  # what a ClassLabel column adds: its class index
                "key": f"s{i:02d}",
            }
        )
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.Sequence(datasets.Value("string")),
            "category": datasets.ClassLabel(names=SHAPES),
            "key": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(root / r["image"]) for r in rows],
            "captions": [r["captions"] for r in rows],
            "category": [SHAPES.index(r["category"]) for r in rows],
            "key": [r["key"] for r in rows],
        },
        features=features,
    )
    ds.save_to_disk(str(root / "hf"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(6))}).save_to_disk(str(root / "dd"))
    return SimpleNamespace(root=root, rows=rows, jsonl=root / "t.jsonl", hf=root / "hf", dd=root / "dd")


def triples(records) -> list[tuple]:
    return [(r.key, r.captions, r.meta) for r in records]


def test_a_saved_dataset_reads_as_the_same_table(data):
    assert {source_kind(p).name for p in (data.hf, data.dd, data.dd / "train")} == {"hf_disk"}
    assert estimate_total(data.hf) == N and len(list(data.hf.glob("data-*.arrow"))) == 2
    want = read_table(data.jsonl)
    got, skipped = read_records(data.hf)
    assert not skipped and triples(got) == triples(want)
    assert got[0].meta == {"category": "circle", "category_index": 0, "key": "s00"}  # name and index
    assert eval_labels(data.hf) == {"category": LabelSet(SHAPES, [])}  # every class, in index order
    # the images stay in the Arrow files: each record holds a reference, read when asked for
    assert all(isinstance(r, ArrowRecord) and "data" not in vars(r) for r in got)
    assert [r.data for r in got] == [(data.root / row["image"]).read_bytes() for row in data.rows]
    a, b = ImageStore(want, 16, cache=True), ImageStore(got, 16, cache=True)
    assert torch.equal(a.cache, b.cache)


def test_references_pickle_and_survive_caption_selection(data):
    got, _ = read_records(data.hf)
    digests = [hashlib.sha1(r.data).hexdigest() for r in got]
    # another process (a spawned DataLoader worker) maps the Arrow file itself
    code = (
        "import hashlib, pickle, sys\n"
        "records = pickle.load(sys.stdin.buffer)\n"
        "print(' '.join(hashlib.sha1(r.data).hexdigest() for r in records))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(got), capture_output=True, timeout=120
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().split() == digests
    # caption selection copies records with dataclasses.replace: the copies keep the reference
    picked = open_train_data(DataConfig(train=str(data.hf), caption_select=[1])).records
    assert [r.key for r in picked] == [r.key for r in got if len(r.captions) > 1]
    assert all(isinstance(r, ArrowRecord) and "data" not in vars(r) for r in picked)
    assert picked[0].data == next(r for r in got if r.key == picked[0].key).data
    assert dataclasses.replace(got[3], captions=["x"]).data == got[3].data


def test_class_labels_paths_and_bytes_columns(data, tmp_path):
    rows = data.rows[:4]
    features = datasets.Features(
        {
            "picture": datasets.Value("string"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=SHAPES),
            "tags": datasets.Sequence(datasets.ClassLabel(names=list(COLOURS))),
        }
    )
    datasets.Dataset.from_dict(
        {
            "picture": [r["image"] for r in rows],  # relative to the image root
            "text": [r["captions"][0] for r in rows],
            "label": [0, 2, -1, 1],  # -1: no label
            "tags": [[0, 3], [], [1], [2, 2]],
        },
        features=features,
    ).save_to_disk(str(tmp_path / "paths"))
    got, _ = read_records(tmp_path / "paths", "picture", "text", data.root)
    assert [r.image for r in got] == [data.root / r["image"] for r in rows]
    assert [r.captions for r in got] == [[r["captions"][0]] for r in rows]
    assert [r.meta for r in got] == [
        {"label": "circle", "tags": ["red", "yellow"], "label_index": 0},
        {"label": "triangle", "tags": [], "label_index": 2},
        {"label": None, "tags": ["green"], "label_index": None},  # -1: no label
        {"label": "square", "tags": ["blue", "blue"], "label_index": 1},
    ]
    assert eval_labels(tmp_path / "paths") == {"label": LabelSet(SHAPES, [])}  # a list of labels: none
    assert [r.key for r in got] == [str(data.root / r["image"]) for r in rows]  # the path, as a table's
    # encoded bytes in a plain binary column, a ClassLabel as the captions
    datasets.Dataset.from_dict(
        {"png": [(data.root / r["image"]).read_bytes() for r in rows], "label": [0, 1, 2, 0]},
        features=datasets.Features(
            {"png": datasets.Value("binary"), "label": datasets.ClassLabel(names=SHAPES)}
        ),
    ).save_to_disk(str(tmp_path / "bytes"))
    got, _ = read_records(tmp_path / "bytes", "png", "label")
    assert [r.captions for r in got] == [["circle"], ["square"], ["triangle"], ["circle"]]
    assert [r.meta for r in got] == [{}] * 4  # the caption column is no metadata
    assert [r.key for r in got] == ["bytes:0", "bytes:1", "bytes:2", "bytes:3"]
    assert [r.data for r in got] == [(data.root / r["image"]).read_bytes() for r in rows]
    # no column 'captions': records without captions (a classification set)
    got, skipped = read_records(tmp_path / "bytes", "png")
    assert not skipped and [r.captions for r in got] == [[]] * 4
    assert [r.meta for r in got] == [{"label": SHAPES[i], "label_index": i} for i in (0, 1, 2, 0)]
    with pytest.raises(
        UserError, match=r"has no column 'image' \(it has \['label', 'png'\]\); set data\.image_column"
    ):
        read_records(tmp_path / "bytes")
    with pytest.raises(UserError, match="holds int64, not images"):
        read_records(tmp_path / "bytes", "label", "label")


def test_a_dataset_dict_is_named_by_its_split(data):
    assert triples(read_records(data.dd / "test")[0]) == triples(read_table(data.root / "test.jsonl"))
    assert len(read_records(data.dd / "train")[0]) == N
    message = rf"'{data.dd}' is a Hugging Face DatasetDict with the splits train, test; point at one split's folder instead, e.g. '{data.dd / 'train'}'\.$"
    with pytest.raises(UserError, match=message):
        read_records(data.dd)
    with pytest.raises(UserError, match=message):
        open_train_data(DataConfig(train=str(data.dd)))


def test_ranks_concatenated_are_the_one_process_batches(data):
    """As tests/test_table_ranks.py for a table: rank r of 2 decodes only its half of every global
    batch, and the halves concatenated are what one process reads."""
    records = open_train_data(DataConfig(train=str(data.hf))).records

    def run(rank: int = 0, world: int = 1) -> list:
        b = TrainBatches(records, 16, 8, seed=3, captions_per_image=2, cache=False, rank=rank, world=world)
        return [x for e in (0, 1) for x in b.epoch(e)]

    one, ranks = run(), [run(r, 2) for r in range(2)]
    assert len(one) == 2 * N // 8
    for step, (images, captions, keys) in enumerate(one):
        parts = [r[step] for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert [c for p in parts for c in p[1]] == captions
        assert [k for p in parts for k in p[2]] == keys
        assert not set(parts[0][2]) & set(parts[1][2])
    assert sorted(k for _, _, keys in one[:3] for k in keys) == sorted(r.key for r in records)


def train_config(source: Path, out: Path, **train) -> dict:
    return {
        "data": {"train": str(source), "cache_images": False, "workers": 2},
        "model": {"overrides": TINY_MODEL},
        "tokenizer": {"vocab_size": 400},
        "train": {
            "output": str(out),
            "batch_size": 8,
            "epochs": 3,
            "warmup_steps": 2,
            "log_every": 1,
            "precision": "fp32",
            "threads": 1,
            **train,
        },
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """9 steps on the saved dataset, decoded in 2 DataLoader worker processes (images read there)."""
    from lipkit.train.launch import run_training

    out = tmp_path_factory.mktemp("hf-train") / "run"
    run_training(config_from_dict(train_config(data.hf, out)))
    return out


def test_training_stopped_and_resumed_is_bitwise_the_same(data, trained, tmp_path, monkeypatch):
    from lipkit.train.launch import run_training
    from lipkit.train.trainer import Trainer

    real, calls = Trainer.step, []

    def step(self, *args, **kw):  # a SIGTERM after step 4 (epoch 1, batch 1)
        calls.append(1)
        out = real(self, *args, **kw)
        if len(calls) == 4:
            self.preemption.handler(15, None)
        return out

    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "run"
    _, first = run_training(config_from_dict(train_config(data.hf, out)))
    assert first.interrupted and first.steps == 4
    (saved,) = sorted((out / "checkpoints").glob("step-*"))
    state = json.loads((saved / "trainer_state.json").read_text())["data"]
    assert (state["epoch"], state["batch"]) == (1, 1)
    _, second = run_training(config_from_dict(train_config(data.hf, out, resume="auto")))
    assert not second.interrupted and second.steps == 9 and len(calls) == 9
    a = load_file(str(trained / "checkpoint" / "model.safetensors"))
    b = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_on_a_split_equals_the_same_table(data, trained, tmp_path):
    from lipkit.eval.suite import run_eval

    cfg = config_from_dict({"eval": {"class_columns": ["category"], "batch_size": 8}})
    results = run_eval(
        trained / "checkpoint",
        {"hf": str(data.dd / "test"), "table": str(data.root / "test.jsonl")},
        cfg,
        tmp_path / "results.json",
    )
    hf, table = (results["splits"][s]["metrics"] for s in ("hf", "table"))
    assert "zeroshot/category/top1" in hf and "retrieval/text_to_image/R@1" in hf
    assert hf == table


@pytest.fixture(scope="module")
def classes(data, tmp_path_factory) -> Path:
    """The first 12 drawn images as a classification set: an Image and a ClassLabel column (NAMES, one
    class without an image), no captions — the usual Hugging Face image classification dataset."""
    out = tmp_path_factory.mktemp("hf-classes") / "shapes"
    datasets.Dataset.from_dict(
        {
            "image": [str(data.root / r["image"]) for r in data.rows[:12]],
            "label": [NAMES.index(r["category"]) for r in data.rows[:12]],
        },
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}),
    ).save_to_disk(str(out))
    return out


def test_a_classification_set_reads_without_captions(data, classes):
    assert source_kind(classes).name == "hf_disk"
    got, skipped = read_records(classes)
    assert not skipped and len(got) == 12 and all(r.captions == [] for r in got)
    assert [r.meta for r in got] == [
        {"label": r["category"], "label_index": NAMES.index(r["category"])} for r in data.rows[:12]
    ]
    assert [r.key for r in got] == [f"shapes:{i}" for i in range(12)]
    assert [r.data for r in got] == [(data.root / r["image"]).read_bytes() for r in data.rows[:12]]
    assert eval_labels(classes) == {"label": LabelSet(NAMES, [])}  # hexagon too, in index order


def test_a_classification_set_evaluates_over_every_class(data, classes, trained, tmp_path):
    """Zero-shot over all of NAMES in index order (hexagon, without an image, competes too) with
    eval.templates; no captions: no retrieval. The metrics are those computed here by hand."""
    from lipkit.checkpoint import load_checkpoint
    from lipkit.eval.suite import run_eval

    cfg = config_from_dict({"eval": {"class_columns": [], "batch_size": 8}})
    result = run_eval(trained / "checkpoint", {"hf": str(classes)}, cfg, tmp_path / "r.json")["splits"]["hf"]
    assert result["similarity"] == "dense" and result["n_images"] == 12 and result["n_texts"] == 0
    assert not any(k.startswith("retrieval/") for k in result["metrics"])
    assert result["chance"]["zeroshot/label/top1"] == pytest.approx(1 / len(NAMES))
    assert result["chance"]["zeroshot/label/mean_recall"] == pytest.approx(1 / len(NAMES))

    model, tok, _ = load_checkpoint(trained / "checkpoint")
    model.eval()
    store = ImageStore(read_table(data.jsonl)[:12], model.spec.image_size, cache=True)  # the same images
    templates = EvalConfig().templates
    with torch.no_grad():
        images = torch.cat([model.embed_images_u8(store.get(range(s, min(12, s + 8)))) for s in (0, 8)])
        text = model.encode_text(tok([t.format(c) for c in NAMES for t in templates])).float().cpu()
    per_class = F.normalize(text.view(len(NAMES), len(templates), -1).mean(1), dim=-1)
    truth = torch.tensor([NAMES.index(r["category"]) for r in data.rows[:12]])
    hit = (images.float() @ per_class.t()).argmax(1) == truth
    recall = [hit[truth == c].double().mean().item() for c in truth.unique()]
    assert result["metrics"] == pytest.approx(
        {
            "zeroshot/label/top1": hit.double().mean().item(),
            "zeroshot/label/top5": 1.0,  # 4 classes
            "zeroshot/label/mean_recall": sum(recall) / len(recall),  # over the classes with images
        },
        abs=1e-9,
    )
