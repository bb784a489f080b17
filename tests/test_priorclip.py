"""PriorCLIP's affiliation loss against a naive per-sample loop (float64, values and gradients), its
neutral settings, and real training runs on cluster labels and on a table column (two ranks against one
process: tests/test_distributed.py's objective-priorclip cases)."""

import json
import math

import pytest
import torch

from conftest import TINY_MODEL
from lipkit.config import config_from_dict
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError
from lipkit.objectives import build_objective
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.priorclip import AffiliationContrast, class_centres
from lipkit.train.launch import run_training
from test_mlcd import write_clusters
from test_objectives import assert_same_value_and_grads, log_scale, unit

CLASSES = torch.tensor([[2, 0], [0, 1], [2, -1], [-1, -1], [0, 3], [5, 5]])  # the first column counts


def naive_affiliation(img, txt, scale, classes):
    n = img.shape[0]
    cls = [int(classes[i, 0]) if classes[i, 0] >= 0 else -(i + 1) for i in range(n)]

    def centre(feats, i):
        members = [j for j in range(n) if cls[j] == cls[i]]
        return sum(feats[j] for j in members) / len(members)

    img_c = [centre(img, j) for j in range(n)]
    txt_c = [centre(txt, j) for j in range(n)]
    total = 0.0
    for i in range(n):
        i2t = torch.stack([scale * torch.dot(img[i], txt_c[j]) for j in range(n)])
        t2i = torch.stack([scale * torch.dot(txt[i], img_c[j]) for j in range(n)])
        total = total - (i2t[i] - torch.logsumexp(i2t, 0)) - (t2i[i] - torch.logsumexp(t2i, 0))
    return 0.5 * total / n


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_priorclip_matches_naive_loop(weight):
    img, txt, t = unit(6, 4, seed=900), unit(6, 4, seed=901), log_scale()

    def slow():
        return InfoNCE()(img, txt, t.exp()) + weight * naive_affiliation(img, txt, t.exp(), CLASSES)

    fast = AffiliationContrast(affiliation_weight=weight)(img, txt, t.exp(), cluster_labels=CLASSES)
    assert_same_value_and_grads(fast, slow(), (img, txt, t))
    by_column = AffiliationContrast(classes="scene", affiliation_weight=weight)
    assert by_column.inputs[-1] == "column_labels" and by_column.label_columns == ["scene"]
    assert_same_value_and_grads(by_column(img, txt, t.exp(), column_labels=CLASSES), slow(), (img, txt, t))


def test_priorclip_neutral_settings_and_gradcheck():
    img, txt, t = unit(6, 4, seed=910), unit(6, 4, seed=911), log_scale()
    off = AffiliationContrast(affiliation_weight=0.0)(img, txt, t.exp(), cluster_labels=CLASSES)
    assert_same_value_and_grads(off, InfoNCE()(img, txt, t.exp()), (img, txt, t))
    distinct = torch.arange(6)[:, None]  # every class its own: the centres are the features
    twice = AffiliationContrast()(img, txt, t.exp(), cluster_labels=distinct)
    assert_same_value_and_grads(twice, 2 * InfoNCE()(img, txt, t.exp()), (img, txt, t))
    assert torch.autograd.gradcheck(lambda x: class_centres(x, CLASSES[:, 0]), (img,))
    for bad in ({"affiliation_weight": -1}, {"classes": ""}):
        with pytest.raises(UserError, match="Objective 'priorclip'"):
            build_objective("priorclip", **bad)


def _config(table, out, cluster_labels="", **args):
    return config_from_dict(
        {
            "data": {"train": str(table), "cluster_labels": cluster_labels},
            "model": {"overrides": TINY_MODEL},
            "tokenizer": {"vocab_size": 400},
            "train": {
                "output": str(out),
                "batch_size": 16,
                "epochs": 1,
                "warmup_steps": 2,
                "log_every": 1,
                "precision": "fp32",
                "objective": "priorclip",
                "objective_args": args,
            },
        }
    )


def test_priorclip_trains_on_cluster_labels_and_on_a_column(table, tmp_path):
    records = read_table(table)
    write_clusters(tmp_path / "clusters", [(r.key, [i % 4, (i + 1) % 4]) for i, r in enumerate(records)], 4)
    runs = {
        "clusters": _config(table, tmp_path / "a", str(tmp_path / "clusters")),
        "column": _config(table, tmp_path / "b", classes="category"),
    }
    for name, cfg in runs.items():
        _, result = run_training(cfg)
        assert result.steps > 0 and math.isfinite(result.last_loss), name
        lines = (tmp_path / ("a" if name == "clusters" else "b") / "metrics.jsonl").read_text().splitlines()
        steps = [x for x in map(json.loads, lines) if x.get("kind") == "train"]
        assert steps and all(x["affiliation_loss"] > 0 for x in steps), name
    with pytest.raises(UserError, match="needs cluster labels; set data.cluster_labels"):
        run_training(_config(table, tmp_path / "none"))
