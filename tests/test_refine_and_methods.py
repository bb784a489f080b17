"""CLIP-Refine against a naive loop and end to end (it narrows the modality gap); every method preset
in configs/methods layers onto the demo config."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL
from lipkit.checkpoint import load_checkpoint
from lipkit.config import config_from_dict, load_config, packaged_config
from lipkit.data.sources.registry import read_table
from lipkit.data.table_batches import ImageStore
from lipkit.errors import UserError
from lipkit.eval.evaluate import embed_images, embed_texts
from lipkit.objectives import OBJECTIVES, build_objective
from lipkit.objectives.refine import CLIPRefine
from lipkit.train.launch import run_training
from objective_inputs import objective_inputs

METHODS = sorted((packaged_config().parent / "methods").glob("*.yaml"))


def naive_refine(x, y, s, tx, ty, ts, z, alpha, lam):
    b = x.shape[0]
    total = 0.0
    for i in range(b):
        t_row = torch.softmax(torch.stack([ts * tx[i] @ ty[j] for j in range(b)]), 0)
        t_col = torch.softmax(torch.stack([ts * ty[i] @ tx[j] for j in range(b)]), 0)
        row = torch.log_softmax(torch.stack([s * x[i] @ y[j] for j in range(b)]), 0)
        col = torch.log_softmax(torch.stack([s * y[i] @ x[j] for j in range(b)]), 0)
        for j in range(b):
            q_r = alpha * (i == j) + (1 - alpha) * t_row[j]
            q_c = alpha * (i == j) + (1 - alpha) * t_col[j]
            total = total - 0.5 * (q_r * row[j] + q_c * col[j]) / b
        total = total + lam * 0.5 * (((x[i] - z[i]) ** 2).sum() + ((y[i] - z[i]) ** 2).sum()) / b
    return total


def test_clip_refine_matches_naive_loop_with_gradients():
    g = torch.Generator().manual_seed(0)
    x, y, tx, ty, z = (
        F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1) for _ in range(5)
    )
    x.requires_grad_(), y.requires_grad_()
    s, ts = torch.tensor(9.0, dtype=torch.float64, requires_grad=True), torch.tensor(7.0, dtype=torch.float64)
    loss = CLIPRefine(alpha=0.3, rafa_weight=0.7)
    fast = loss(x, y, s, tx, ty, ts, reference=z)
    slow = naive_refine(x, y, s, tx, ty, ts, z, 0.3, 0.7)
    assert torch.allclose(fast, slow, atol=1e-10)
    for a, b in zip(torch.autograd.grad(fast, (x, y, s)), torch.autograd.grad(slow, (x, y, s)), strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, c: loss(a, b, c, tx, ty, ts, reference=z), (x, y, s))


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_presets_layer_on_the_demo(path):
    cfg = load_config([packaged_config(), path])
    assert cfg.train.objective in OBJECTIVES
    assert cfg.model.preset == "tiny"  # the demo's settings survive where the preset is silent


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_preset_objective_builds_with_its_args_and_trains(path):
    """The preset's objective with its objective_args, built as training builds it (launch.py), takes one
    forward and backward: finite loss, finite non-zero gradients for every input it declares."""
    t = load_config([packaged_config(), path]).train
    objective = build_objective(t.objective, **t.objective_args)
    for key, value in t.objective_args.items():  # the preset's settings reach the objective
        assert getattr(objective, key) == value, key
    inputs = objective_inputs(objective)
    leaves = [x for x in inputs.values() if torch.is_tensor(x) and x.requires_grad]  # itm's head is a module
    assert leaves
    # a staged objective (LexLIP: masked-language steps, then contrastive ones) reads some inputs only in its
    # later stage: a step of each stage (its step count moved to the switch), the gradients accumulated
    for stage in range(2 if getattr(objective, "bottleneck_steps", 0) else 1):
        if stage:
            objective.steps_seen.fill_(objective.bottleneck_steps)
        loss = objective(**inputs)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in leaves)


def gap(checkpoint: Path, table: Path) -> float:
    model, tok, _ = load_checkpoint(checkpoint)
    records = read_table(table)[:64]
    img = embed_images(model, ImageStore(records, model.spec.image_size, cache=True), 64)
    txt = embed_texts(model, tok, [r.captions[0] for r in records], 64)
    return float((img.mean(0) - txt.mean(0)).norm())


def test_refine_narrows_the_modality_gap(table, tmp_path):
    base = {
        "data": {"train": str(table)},
        "model": {"overrides": TINY_MODEL},
        "tokenizer": {"vocab_size": 400},
        "train": {"output": str(tmp_path / "a"), "batch_size": 16, "epochs": 4, "precision": "fp32"},
    }
    run_training(config_from_dict(base))
    with pytest.raises(UserError, match="model.init_from"):
        run_training(config_from_dict({**base, "train": {**base["train"], "objective": "clip_refine"}}))
    preset = packaged_config().parent / "methods" / "clip_refine.yaml"
    cfg = load_config(
        preset,
        [
            f"model.init_from={tmp_path / 'a' / 'checkpoint'}",
            f"data.train={table}",
            f"train.output={tmp_path / 'b'}",
            "train.batch_size=16",
            "train.lr=3e-3",
            "train.epochs=3",
            "train.precision=fp32",
        ],
    )
    run_training(cfg)
    before, after = gap(tmp_path / "a" / "checkpoint", table), gap(tmp_path / "b" / "checkpoint", table)
    assert after < before, (before, after)  # measured: 1.17 → 1.09 (-7%) on this fixture
