"""MLCD's multi-label cluster discrimination against a naive per-sample loop (float64, values and
gradients), its neutral weight, the per-sample labels read from a `lipkit data cluster` folder, and a
real training run on cluster labels (two ranks against one process, with a resume of the optimiser state:
tests/test_distributed.py's objective-mlcd cases)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import TINY_MODEL
from lipkit.config import config_from_dict
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.mlcd import MultiLabelClusterDiscrimination, multi_label_loss
from lipkit.train.inputs import sample_ids
from lipkit.train.launch import run_training
from lipkit.train.sample_labels import SampleLabels
from test_objectives import assert_same_value_and_grads, log_scale, unit

LABELS = torch.tensor([[0, 3], [2, -1], [-1, -1], [4, 1], [1, 0], [3, 2]])


def naive_mlcd(img, centres, labels, scale):
    total, counted = 0.0, 0
    w = [c / torch.sqrt((c * c).sum()) for c in centres]
    for i in range(img.shape[0]):
        positives = {int(x) for x in labels[i] if x >= 0}
        if not positives:
            continue
        s = [scale * torch.dot(img[i], w[j]) for j in range(len(w))]
        neg = torch.logsumexp(
            torch.stack(
                [torch.zeros((), dtype=img.dtype)] + [s[j] for j in range(len(w)) if j not in positives]
            ),
            0,
        )
        pos = torch.logsumexp(
            torch.stack([torch.zeros((), dtype=img.dtype)] + [-s[p] for p in sorted(positives)]), 0
        )
        total, counted = total + neg + pos, counted + 1
    return total / counted


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.0, 1.0), (0.5, 2.0)])
def test_mlcd_matches_naive_loop(weights):
    img, txt, t = unit(6, 4, seed=700), unit(6, 4, seed=701), log_scale()
    loss = MultiLabelClusterDiscrimination(
        scale=8.0, contrastive_weight=weights[0], cluster_weight=weights[1]
    )
    loss.bind(5, 4)
    loss.centres.data = loss.centres.data.double()
    centres = loss.centres
    fast = loss(img, txt, t.exp(), cluster_labels=LABELS)
    slow = weights[1] * naive_mlcd(img, centres, LABELS, 8.0)
    if weights[0]:
        slow = slow + weights[0] * InfoNCE()(img, txt, t.exp())
    assert_same_value_and_grads(fast, slow, (img, centres, t) if weights[0] else (img, centres))


def test_mlcd_neutral_weight_is_infonce_and_gradcheck():
    img, txt, t = unit(6, 4, seed=710), unit(6, 4, seed=711), log_scale()
    neutral = MultiLabelClusterDiscrimination(cluster_weight=0.0, num_clusters=5, embed_dim=4)
    assert_same_value_and_grads(
        neutral(img, txt, t.exp(), cluster_labels=LABELS), InfoNCE()(img, txt, t.exp()), (img, txt, t)
    )
    centres = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, c: multi_label_loss(8.0 * x @ F.normalize(c, dim=-1).t(), LABELS), (img, centres)
    )
    with pytest.raises(ValueError, match="cluster_weight"):
        MultiLabelClusterDiscrimination(cluster_weight=-1)


def write_clusters(folder, rows, k):
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "clusters.jsonl").open("w") as f:
        for key, labels in rows:
            f.write(json.dumps({"key": key, "cluster": labels[0], "distance": 0.1, "labels": labels}) + "\n")
    (folder / "cluster.json").write_text(json.dumps({"k": k, "labels_per_sample": len(rows[0][1])}))


def test_sample_labels_by_key(tmp_path):
    write_clusters(tmp_path / "c", [("a", [1, 2]), ("b", [0, 1]), ("ü/x", [2, 0])], 3)
    table = SampleLabels.from_clusters(tmp_path / "c")
    got = table.lookup(sample_ids(["b", "nope", "ü/x", "a"]))
    assert got.tolist() == [[0, 1], [-1, -1], [2, 0], [1, 2]] and table.num_classes == 3
    (tmp_path / "c" / "cluster.json").unlink()
    with pytest.raises(UserError, match="not a finished `lipkit data cluster` folder"):
        SampleLabels.from_clusters(tmp_path / "c")
    assert SampleLabels(["a", "a", "b"], [[0], [0], [1]], 2).lookup(sample_ids(["a"])).tolist() == [[0]]
    with pytest.raises(UserError, match="key 'a' two different label lists"):
        SampleLabels(["a", "a"], [[0], [1]], 2)
    write_clusters(tmp_path / "bad", [("a", [1, 5])], 3)
    with pytest.raises(UserError, match="damaged .*line 1 has a cluster outside 0 … 2"):
        SampleLabels.from_clusters(tmp_path / "bad")
    (tmp_path / "bad" / "clusters.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="damaged"):
        SampleLabels.from_clusters(tmp_path / "bad")
    assert table.check_covers(["a", "zz"], "t") == 0.5
    with pytest.raises(UserError, match="None of the 1 samples of t has cluster labels"):
        table.check_covers(["zz"], "t")


def test_resuming_with_other_clusters_is_refused():
    saved = MultiLabelClusterDiscrimination(num_clusters=5, embed_dim=4).state_dict()
    with pytest.raises(UserError, match="5 class centres of 4 dims do not fit this run's 6 clusters"):
        MultiLabelClusterDiscrimination(num_clusters=6, embed_dim=4).load_state_dict(saved)


def test_mlcd_trains_on_cluster_labels_and_keeps_its_centres_in_the_training_state(table, tmp_path):
    records = read_table(table)
    write_clusters(
        tmp_path / "clusters", [(r.key, [i % 7, (i * 3 + 1) % 7]) for i, r in enumerate(records)], 7
    )

    def config(out, epochs, cluster_labels=str(tmp_path / "clusters")):
        return config_from_dict(
            {
                "data": {"train": str(table), "cluster_labels": cluster_labels},
                "model": {"overrides": TINY_MODEL},
                "tokenizer": {"vocab_size": 400},
                "train": {
                    "output": str(out),
                    "batch_size": 16,
                    "epochs": epochs,
                    "warmup_steps": 2,
                    "log_every": 1,
                    "precision": "fp32",
                    "objective": "mlcd",
                    "save_every": 2,
                },
            }
        )

    _, result = run_training(config(tmp_path / "run", 2))
    assert result.steps > 0 and math.isfinite(result.last_loss)
    losses = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in losses if x.get("kind") == "train"]
    assert steps and all(x["cluster_loss"] > 0 and x["labelled_share"] == 1.0 for x in steps)
    state = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert not any("centres" in k for k in state)  # the class centres stay with the training state
    from lipkit.checkpoint import load_training_state

    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    tensors, _ = load_training_state(newest)
    assert tensors["objective.centres"].shape == (7, TINY_MODEL["embed_dim"])
    with pytest.raises(UserError, match="needs cluster labels; set data.cluster_labels"):
        run_training(config(tmp_path / "none", 1, cluster_labels=""))
    write_clusters(tmp_path / "other", [("elsewhere/0.png", [0, 1])], 7)
    with pytest.raises(UserError, match="has cluster labels: the keys differ"):
        run_training(config(tmp_path / "other-run", 1, cluster_labels=str(tmp_path / "other")))
