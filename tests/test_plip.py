"""PLIP's identity contrast and attribute heads against a naive loop (float64, values and gradients), the
neutral setting, the per-sample column labels read from a table, and a real training run."""

import json
import math

import pytest
import torch

from conftest import TINY_MODEL
from lipkit.config import config_from_dict
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.plip import IdentityContrast
from lipkit.train.inputs import sample_ids
from lipkit.train.launch import run_training
from lipkit.train.sample_labels import SampleLabels
from test_objectives import assert_same_value_and_grads, log_scale, unit

LABELS = torch.tensor([[0, 1], [1, 0], [0, -1], [-1, 2], [2, 2], [1, 1]])  # identity, attribute


def naive_plip(img, txt, scale, labels, heads, weight):
    n = img.shape[0]
    ident = [int(labels[i, 0]) if labels[i, 0] >= 0 else -(i + 1) for i in range(n)]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(n)])
        col = torch.stack([scale * torch.dot(img[j], txt[i]) for j in range(n)])
        pos = [j for j in range(n) if ident[j] == ident[i]]
        total = total - sum((row[j] - torch.logsumexp(row, 0)) for j in pos) / len(pos)
        total = total - sum((col[j] - torch.logsumexp(col, 0)) for j in pos) / len(pos)
    loss = 0.5 * total / n
    head = heads[0]
    rows = [i for i in range(n) if labels[i, 1] >= 0]
    ce = 0.0
    for i in rows:
        z = torch.stack(
            [torch.dot(head.weight[c], img[i]) + head.bias[c] for c in range(head.weight.shape[0])]
        )
        ce = ce - (z[int(labels[i, 1])] - torch.logsumexp(z, 0))
    return loss + weight * ce / len(rows)


def test_plip_matches_naive_loop():
    img, txt, t = unit(6, 4, seed=800), unit(6, 4, seed=801), log_scale()
    loss = IdentityContrast(identity="person", attributes=["colour"], attribute_weight=0.7)
    loss.bind_columns([["p0", "p1", "p2"], ["red", "green", "blue"]], 4)
    loss.double()
    fast = loss(img, txt, t.exp(), column_labels=LABELS)
    slow = naive_plip(img, txt, t.exp(), LABELS, loss.heads, 0.7)
    w, b = loss.heads[0].weight, loss.heads[0].bias
    assert_same_value_and_grads(fast, slow, (img, txt, t, w, b))


def test_plip_neutral_is_infonce():
    img, txt, t = unit(5, 3, seed=810), unit(5, 3, seed=811), log_scale()
    assert_same_value_and_grads(
        IdentityContrast()(img, txt, t.exp()), InfoNCE()(img, txt, t.exp()), (img, txt, t)
    )
    distinct = IdentityContrast(identity="person")(img, txt, t.exp(), column_labels=torch.arange(5)[:, None])
    assert_same_value_and_grads(distinct, InfoNCE()(img, txt, t.exp()), (img, txt, t))
    with pytest.raises(ValueError, match="attribute_weight"):
        IdentityContrast(attribute_weight=-1)


def test_column_labels_from_records():
    records = [
        Record(image=f"{i}.png", captions=["x"], meta={"person": p, "colour": c}, key=f"k{i}")
        for i, (p, c) in enumerate([("bob", "red"), ("amy", ""), ("bob", "blue"), ("cy", None)])
    ]
    labels = SampleLabels.from_records(records, ["person", "colour"], "t")
    assert labels.classes == [["amy", "bob", "cy"], ["blue", "red"]]
    got = labels.lookup(sample_ids(["k0", "k1", "k2", "k3"]))
    assert got.tolist() == [[1, 1], [0, -1], [1, 0], [2, -1]]
    with pytest.raises(UserError, match="No row of t has the column\\(s\\) 'hair'"):
        SampleLabels.from_records(records, ["person", "hair"], "t")
    again = records + [
        Record(image="0.png", captions=["y"], meta={"person": "bob", "colour": None}, key="k0")
    ]
    assert SampleLabels.from_records(again, ["person", "colour"], "t").lookup(
        sample_ids(["k0"])
    ).tolist() == [[1, 1]]
    clash = records + [
        Record(image="0.png", captions=["y"], meta={"person": "amy", "colour": "red"}, key="k0")
    ]
    with pytest.raises(UserError, match="key 'k0' give column 'person' two values"):
        SampleLabels.from_records(clash, ["person", "colour"], "t")
    floats = [
        Record(image=f"{i}.png", captions=["x"], meta={"n": v}, key=f"f{i}")
        for i, v in enumerate([1.0, 1, float("nan")])
    ]
    assert SampleLabels.from_records(floats, ["n"], "t").classes == [["1"]]


def test_resuming_on_other_attribute_values_is_refused():
    saved = IdentityContrast(identity="p", attributes=["colour"])
    saved.bind_columns([["a"], ["red", "blue"]], 4)
    other = IdentityContrast(identity="p", attributes=["colour"])
    other.bind_columns([["a"], ["red", "green"]], 4)
    with pytest.raises(UserError, match="sized to other values of colour"):
        other.load_state_dict(saved.state_dict())
    same = IdentityContrast(identity="p", attributes=["colour"])
    same.bind_columns([["b"], ["red", "blue"]], 4)  # identities may differ: they have no head
    same.load_state_dict(saved.state_dict())


def test_plip_trains_on_a_tables_columns(table, tmp_path):
    def config(source, out):
        return config_from_dict(
            {
                "data": {"train": str(source)},
                "model": {"overrides": TINY_MODEL},
                "tokenizer": {"vocab_size": 400},
                "train": {
                    "output": str(out),
                    "batch_size": 16,
                    "epochs": 1,
                    "warmup_steps": 2,
                    "log_every": 1,
                    "precision": "fp32",
                    "objective": "plip",
                    "objective_args": {"identity": "concept", "attributes": ["category", "subcategory"]},
                },
            }
        )

    _, result = run_training(config(table, tmp_path / "run"))
    assert result.steps > 0 and math.isfinite(result.last_loss)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("kind") == "train"]
    assert steps and all(x["attribute_loss"] > 0 for x in steps)
    from lipkit.data.convert import convert

    convert(table, tmp_path / "shards", 50, "image", "captions", "", False)
    with pytest.raises(UserError, match="train on a table"):
        run_training(config(tmp_path / "shards", tmp_path / "run2"))
