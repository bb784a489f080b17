"""The improved baselines' SimSiam and BYOL image terms against a naive per-sample loop (float64, values
and gradients, the predictor's included), BYOL's EMA model, and training end to end with each; two ranks
against one process (the predictor's BatchNorm on the global batch) in tests/test_distributed.py."""

import math

import pytest
import torch

from conftest import TINY_MODEL
from lipkit.config import config_from_dict
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives.improved_baselines import ImprovedBaselines, smoothed_clip_loss
from lipkit.train.launch import run_training
from test_objectives import assert_same_value_and_grads, log_scale, unit


def naive_predict(pred, z):
    lin1, bn, lin2 = pred.net[0], pred.net[1], pred.net[3]
    h = torch.stack([lin1.weight @ z[i] for i in range(z.shape[0])])
    mean = sum(h[i] for i in range(h.shape[0])) / h.shape[0]
    var = sum((h[i] - mean) ** 2 for i in range(h.shape[0])) / h.shape[0]
    h = torch.relu((h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    return torch.stack([lin2.weight @ h[i] + lin2.bias for i in range(h.shape[0])])


def cos(a, b):
    return torch.dot(a, b) / torch.sqrt(torch.dot(a, a) * torch.dot(b, b))


@pytest.mark.parametrize("ssl", ["simsiam", "byol"])
def test_siamese_terms_match_naive_loop(ssl):
    x1, x2, y, t = unit(5, 4, seed=980), unit(5, 4, seed=981), unit(5, 4, seed=982), log_scale()
    m1, m2 = unit(5, 4, seed=983).detach(), unit(5, 4, seed=984).detach()
    obj = ImprovedBaselines(label_smoothing=0.1, image_ssl=ssl, ssl_weight=0.5, ssl_hidden=16).double()
    obj(x1, y, t.exp(), x2, m1, m2)  # builds the predictor (a trainer binds it first)
    obj.predictor.double()
    fast = obj(x1, y, t.exp(), x2, m1, m2)
    q1, q2 = naive_predict(obj.predictor, x1), naive_predict(obj.predictor, x2)
    n = x1.shape[0]
    if ssl == "simsiam":
        term = -0.5 * sum(cos(q1[i], x2[i].detach()) + cos(q2[i], x1[i].detach()) for i in range(n)) / n
    else:
        term = sum((2 - 2 * cos(q1[i], m2[i])) + (2 - 2 * cos(q2[i], m1[i])) for i in range(n)) / n
    slow = smoothed_clip_loss(x1, y, t.exp(), 0.1) + 0.5 * term
    assert_same_value_and_grads(fast, slow, (x1, x2, y, t, *obj.predictor.parameters()))


def test_byol_binds_an_ema_model_and_simsiam_none():
    torch.manual_seed(0)
    model = DualEncoder(get_spec("tiny", **TINY_MODEL, vocab_size=50))
    assert ImprovedBaselines(image_ssl="simsiam").bind_model(model) is None
    byol = ImprovedBaselines(image_ssl="byol", ssl_momentum=0.5)
    teacher = byol.bind_model(model)
    assert byol.predictor.net[0].in_features == TINY_MODEL["embed_dim"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    byol.after_step(model)
    assert torch.allclose(next(teacher.parameters()), next(model.parameters()) - 1.0, atol=1e-6)


@pytest.mark.parametrize("ssl", ["simsiam", "byol", "swav"])
def test_siamese_terms_train(table, tmp_path, ssl):
    cfg = config_from_dict(
        {
            "data": {"train": str(table)},
            "model": {"overrides": TINY_MODEL},
            "tokenizer": {"vocab_size": 400},
            "train": {
                "output": str(tmp_path / "run"),
                "batch_size": 16,
                "epochs": 1,
                "warmup_steps": 2,
                "log_every": 1,
                "precision": "fp32",
                "objective": "improved_baselines",
                "objective_args": {"image_ssl": ssl, "ssl_hidden": 16},
            },
        }
    )
    _, result = run_training(cfg)
    assert result.steps > 0 and math.isfinite(result.last_loss) and result.faults == 0


def naive_sinkhorn(scores):
    b, k = scores.shape
    q = [[torch.exp(scores[i, j] / 0.05) for i in range(b)] for j in range(k)]  # (K, B)
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(3):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]
    return torch.stack([torch.stack([q[j][i] * b for j in range(k)]) for i in range(b)])


def test_swav_term_matches_naive_loop():
    x1, x2, y, t = unit(6, 4, seed=990), unit(6, 4, seed=991), unit(6, 4, seed=992), log_scale()
    obj = ImprovedBaselines(
        label_smoothing=0.0, image_ssl="swav", swav_prototypes=3, ssl_temperature=0.2
    ).double()
    obj(x1, y, t.exp(), x2)
    obj.prototypes.double()
    fast = obj(x1, y, t.exp(), x2)
    c = obj.prototypes.weight / obj.prototypes.weight.norm(dim=1, keepdim=True)
    s1, s2 = x1 @ c.t(), x2 @ c.t()
    with torch.no_grad():
        q1, q2 = naive_sinkhorn(s1), naive_sinkhorn(s2)
    assert torch.allclose(q1.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-12)  # codes per sample
    n = x1.shape[0]
    term = 0.0
    for i in range(n):
        term = term - sum(q2[i, k] * (s1[i, k] / 0.2 - torch.logsumexp(s1[i] / 0.2, 0)) for k in range(3))
        term = term - sum(q1[i, k] * (s2[i, k] / 0.2 - torch.logsumexp(s2[i] / 0.2, 0)) for k in range(3))
    slow = smoothed_clip_loss(x1, y, t.exp(), 0.0) + 0.5 * term / n
    assert_same_value_and_grads(fast, slow, (x1, x2, y, t, obj.prototypes.weight))
