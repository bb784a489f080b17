"""Distillation (objectives/distill.py, train/teacher.py, `lipkit distill`): the loss against a naive
per-pair loop (values and gradients, float64), its neutral settings, the teacher's pixel conversion and
feature caches (cached equals recomputed, also over a whole run), and the command end to end."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_MODEL, tiny_eval_setup
from lipkit.cli import app
from lipkit.config import config_from_dict
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import IMAGENET_MEAN, IMAGENET_STD, get_spec
from lipkit.objectives.distill import Distillation
from lipkit.objectives.infonce import InfoNCE
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.inputs import caption_keys
from lipkit.train.launch import run_training
from lipkit.train.teacher import FrozenTeacher, RowCache, check_same_tokenizer

F64 = torch.float64


def unit(*shape, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).requires_grad_(grad)


def naive(x, y, s, xt, yt, st, wi, wt, w, temperature):
    """The docstring's formula, one pair (and one batch row) at a time."""
    b = x.shape[0]
    wc, wkd, wf, wa = w
    total = 0.0
    for i in range(b):
        row = torch.log_softmax(torch.stack([s * x[i] @ y[j] for j in range(b)]), 0)
        col = torch.log_softmax(torch.stack([s * y[i] @ x[j] for j in range(b)]), 0)
        total = total - wc * 0.5 * (row[i] + col[i]) / b
        p_row = torch.log_softmax(torch.stack([s * x[i] @ y[j] / temperature for j in range(b)]), 0)
        p_col = torch.log_softmax(torch.stack([s * y[i] @ x[j] / temperature for j in range(b)]), 0)
        q_row = torch.log_softmax(torch.stack([st * xt[i] @ yt[j] / temperature for j in range(b)]), 0)
        q_col = torch.log_softmax(torch.stack([st * yt[i] @ xt[j] / temperature for j in range(b)]), 0)
        for j in range(b):
            kl = q_row[j].exp() * (q_row[j] - p_row[j]) + q_col[j].exp() * (q_col[j] - p_col[j])
            total = total + wkd * 0.5 * kl * temperature**2 / b
        total = total + wf * 0.5 * (((wi @ x[i] - xt[i]) ** 2).sum() + ((wt @ y[i] - yt[i]) ** 2).sum()) / b
        for feats, teacher in ((x, xt), (y, yt)):
            g_s = torch.stack([feats[i] @ feats[j] for j in range(b)])
            g_t = torch.stack([teacher[i] @ teacher[j] for j in range(b)])
            diff = g_s / g_s.norm() - g_t / g_t.norm()
            total = total + wa * 0.5 * (diff**2).sum() / (b * b)
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_matches_naive_loop_with_gradients(temperature):
    b, d, dt = 5, 4, 6
    x, y = unit(b, d, seed=1, grad=True), unit(b, d, seed=2, grad=True)
    xt, yt = unit(b, dt, seed=3), unit(b, dt, seed=4)
    s, st = torch.tensor(8.0, dtype=F64, requires_grad=True), torch.tensor(12.0, dtype=F64)
    w = (0.7, 1.3, 0.9, 1.1)
    loss = Distillation(*w, kd_temperature=temperature)
    loss.bind_teacher(d, dt)
    loss.double()
    fast = loss(x, y, s, xt, yt, st)
    wi, wt = loss.image_projection.weight, loss.text_projection.weight
    slow = naive(x, y, s, xt, yt, st, wi, wt, w, temperature)
    assert abs(float((fast - slow).detach())) < 1e-10
    leaves = (x, y, s, wi, wt)
    for a, c in zip(torch.autograd.grad(fast, leaves), torch.autograd.grad(slow, leaves), strict=True):
        assert torch.allclose(a, c, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda a, c, sc: loss(a, c, sc, xt, yt, st), (x, y, s))


def test_neutral_settings_reproduce_infonce_and_a_student_equal_to_its_teacher_pays_nothing():
    b, d = 6, 5
    x, y, xt, yt = (unit(b, d, seed=k) for k in range(4))
    s = torch.tensor(9.0, dtype=F64)
    neutral = Distillation(1.0, 0.0, 0.0, 0.0)
    assert abs(float(neutral(x, y, s, xt, yt, s) - InfoNCE()(x, y, s))) < 1e-10
    copy = Distillation(0.0, 1.0, 1.0, 1.0, kd_temperature=2.0)
    copy.bind_teacher(d, d)  # identity projections when the widths agree
    assert abs(float(copy.double()(x, y, s, x, y, s).detach())) < 1e-12
    assert float(copy(x, y, s, xt, yt, s).detach()) > 0.01
    with pytest.raises(ValueError, match="weights"):
        Distillation(0.0, 0.0, 0.0, 0.0)


def test_the_teacher_sees_the_students_view_in_its_own_pixel_space():
    student = get_spec("tiny", **TINY_MODEL)
    spec = get_spec(
        "tiny", **{**TINY_MODEL, "image_size": 48}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    teacher = FrozenTeacher(DualEncoder(spec), student)
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (student.image_mean, student.image_std))
    got = teacher.pixels((pixels - mean) / std)
    want = F.interpolate(pixels, size=(48, 48), mode="bilinear", antialias=True)
    want = (want - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert got.shape == (2, 3, 48, 48) and torch.allclose(got, want, atol=1e-5)
    same = FrozenTeacher(DualEncoder(student), student)
    x = torch.randn(2, 3, 32, 32)
    assert same.pixels(x) is x
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # always evaluated as in inference (BatchNorm statistics, dropout)


def test_cached_teacher_features_equal_recomputed_ones():
    torch.manual_seed(0)
    spec = get_spec("tiny", **TINY_MODEL, vocab_size=300, context_length=8)
    model = DualEncoder(spec).eval()
    cached = FrozenTeacher(model, spec)
    cached.cache_images = True
    images, ids = torch.randn(6, 3, 32, 32), torch.randint(3, 300, (6, 8))
    images[5], ids[5] = images[1], ids[1]  # a repeated image and caption: one key each
    for rows in (slice(0, 4), slice(2, 6), slice(0, 6)):  # overlapping batches: some rows cached
        got = cached.features(images[rows], ids[rows], caption_keys(ids[rows]))
        with torch.no_grad():
            want = F.normalize(model.visual(images[rows]), dim=-1), F.normalize(model.text(ids[rows]), dim=-1)
        for a, c in zip(got[:2], want, strict=True):
            assert torch.allclose(a, c, atol=1e-6, rtol=0)
    assert len(cached.image_rows.rows) == 5 and len(cached.text_rows.rows) == 5
    small = RowCache(limit=2)  # full: rows past the limit are computed, not kept
    out = small.features([0, 1, 2, 3], lambda rows: torch.tensor(rows, dtype=torch.float).unsqueeze(1))
    assert out.squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0] and not small.rows


def _teacher(table: Path, tmp: Path) -> Path:
    cfg = {
        "data": {"train": str(table)},
        "model": {"overrides": TINY_MODEL},
        "tokenizer": {"vocab_size": 400, "context_length": 16},
        "train": {"output": str(tmp / "teacher"), "batch_size": 16, "epochs": 2, "precision": "fp32"},
    }
    run_training(config_from_dict(cfg))
    return tmp / "teacher" / "checkpoint"


def _student(table: Path, teacher: Path, out: Path, **train) -> dict:
    return {
        "data": {"train": str(table)},
        "model": {"overrides": {**TINY_MODEL, "embed_dim": 16, "vision_width": 16, "text_width": 16}},
        "tokenizer": {"context_length": 16},
        "augment": {"scale_min": 1.0, "rotate_deg": 0.0},  # off: the teacher's image features are cached
        "train": {
            "output": str(out),
            "batch_size": 16,
            "epochs": 1,
            "precision": "fp32",
            "objective": "distill",
            "teacher": str(teacher),
            "objective_args": {"feature_weight": 1.0, "affinity_weight": 1.0},
            **train,
        },
    }


def test_distillation_runs_end_to_end_and_caching_changes_nothing(table, tmp_path):
    teacher = _teacher(table, tmp_path)
    weights = {}
    for cache in (True, False):
        out = tmp_path / f"student-{cache}"
        run_training(config_from_dict(_student(table, teacher, out, cache_image_features=cache)))
        weights[cache] = load_file(str(out / "checkpoint" / "model.safetensors"))
        assert (out / "checkpoint" / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
    assert weights[True].keys() == weights[False].keys()
    worst = max(float((weights[True][k] - weights[False][k]).abs().max()) for k in weights[True])
    assert worst < 1e-5, worst  # cached teacher features are the recomputed ones
    with pytest.raises(UserError, match="learns from no teacher"):
        run_training(
            config_from_dict(_student(table, teacher, tmp_path / "x", objective="infonce", objective_args={}))
        )
    with pytest.raises(UserError, match="train.teacher"):
        run_training(config_from_dict(_student(table, "", tmp_path / "y")))


def test_distill_command_trains_a_smaller_student(table, tmp_path):
    teacher = _teacher(table, tmp_path)
    out = tmp_path / "cli"
    args = ["distill", str(teacher), "--data", str(table), "--student", "tiny", "--out", str(out)]
    args += ["--set", f"model.overrides={TINY_MODEL | {'embed_dim': 16}}".replace("'", '"')]
    args += [
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=16",
        "--set",
        "tokenizer.context_length=16",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    state = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert math.isfinite(float(state["logit_scale"]))
    help_text = CliRunner().invoke(app, ["distill", "--help"]).output
    assert "--student" in help_text and "teacher" in help_text.lower()


def test_a_student_reads_its_teachers_token_ids(table):
    records, tok, _ = tiny_eval_setup(table)
    captions = [c for r in records for c in r.captions]
    check_same_tokenizer(tok, TextTokenizer(tok.tok, 40), "model.init_from")  # another context length
    other = TextTokenizer.train(captions[::-1] + ["zebra crossing"] * 20, vocab_size=320, context_length=16)
    with pytest.raises(UserError, match="unset model.text_pretrained"):
        check_same_tokenizer(tok, other, "model.text_pretrained")
