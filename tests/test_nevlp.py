"""NEVLP's noise-adaptive loss (lipkit.objectives.nevlp) against naive loops: the per-pair losses, the
loss history bank, the EM fit of the two-component mixture and the weighted loss (values and gradients,
float64); it is InfoNCE / multi-positive with no noise; its state resumes exactly, in a real run killed
and resumed too. Two gloo ranks against one process: tests/test_distributed.py."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.objectives import build_objective
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.multi_positive import MultiPositiveInfoNCE
from lipkit.objectives.nevlp import (
    EM_ITERATIONS,
    VARIANCE_FLOOR,
    NoiseAdaptiveContrast,
    fit_mixture,
    noise_probability,
    per_pair_losses,
)
from lipkit.train.inputs import sample_ids
from test_resume import (
    assert_same,
    killed_and_resumed_objective_states,
)

F64 = torch.float64
TOL = 1e-10


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).requires_grad_()


def naive_pair_losses(img, txt, scale, owner=None) -> list[torch.Tensor]:
    """ℓ_i by loops: logsumexp over each image's row and each caption's column."""
    n, t = img.shape[0], txt.shape[0]
    owner = list(range(n)) if owner is None else [int(o) for o in owner]
    logit = [[scale * torch.dot(img[i], txt[j]) for j in range(t)] for i in range(n)]
    out = []
    for i in range(n):
        mine = [j for j in range(t) if owner[j] == i]
        row_lse = torch.logsumexp(torch.stack(logit[i]), 0)
        row = -sum(logit[i][j] - row_lse for j in mine) / len(mine)
        col = 0.0
        for j in mine:
            column = torch.stack([logit[a][j] for a in range(n)])
            col = col - (logit[i][j] - torch.logsumexp(column, 0))
        out.append(0.5 * (row + col / len(mine)))
    return out


def naive_em(values: list[float]) -> tuple[float, float, list[float], list[float], list[float]]:
    lo, hi = min(values), max(values)
    u = [(v - lo) / (hi - lo) for v in values]
    mean_u = sum(u) / len(u)
    var0 = sum((x - mean_u) ** 2 for x in u) / len(u) + VARIANCE_FLOOR
    m, s, w = [0.0, 1.0], [var0, var0], [0.5, 0.5]
    for _ in range(EM_ITERATIONS):
        resp = []
        for x in u:
            p = [
                w[c] * math.exp(-0.5 * (x - m[c]) ** 2 / s[c]) / math.sqrt(2 * math.pi * s[c]) for c in (0, 1)
            ]
            resp.append([p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])])
        mass = [sum(r[c] for r in resp) for c in (0, 1)]
        w = [mass[c] / len(u) for c in (0, 1)]
        m = [sum(r[c] * x for r, x in zip(resp, u, strict=True)) / mass[c] for c in (0, 1)]
        s = [
            sum(r[c] * (x - m[c]) ** 2 for r, x in zip(resp, u, strict=True)) / mass[c] + VARIANCE_FLOOR
            for c in (0, 1)
        ]
    if m[0] > m[1]:  # component 1 is the noisy one: the larger mean
        m, s, w = m[::-1], s[::-1], w[::-1]
    return lo, hi, m, s, w


def naive_posterior(h: float, lo, hi, m, s, w) -> float:
    x = min(max((h - lo) / (hi - lo), 0.0), 1.0)
    p = [w[c] * math.exp(-0.5 * (x - m[c]) ** 2 / s[c]) / math.sqrt(2 * math.pi * s[c]) for c in (0, 1)]
    return p[1] / (p[0] + p[1])


@pytest.mark.parametrize("owner", [None, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [0, 1, 1, 2, 3, 3, 3, 4, 0, 2]])
def test_per_pair_losses_match_the_loop(owner):
    img = unit(5, 6, seed=1)
    txt = unit(5 if owner is None else len(owner), 6, seed=2)
    scale = torch.tensor(3.0, dtype=F64, requires_grad=True)
    own = None if owner is None else torch.tensor(owner)
    fast = per_pair_losses(img, txt, scale, own)
    slow = torch.stack(naive_pair_losses(img, txt, scale, owner))
    assert torch.allclose(fast, slow, atol=TOL, rtol=0)
    weights = torch.linspace(0.2, 1.0, 5, dtype=F64)
    g_fast = torch.autograd.grad((weights * fast).sum(), (img, txt, scale))
    g_slow = torch.autograd.grad((weights * slow).sum(), (img, txt, scale))
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=0)


def test_without_noise_it_is_infonce_and_multi_positive():
    img, txt, scale = unit(6, 5, seed=3), unit(12, 5, seed=4), torch.tensor(4.0, dtype=F64)
    keys = torch.arange(6)
    plain = NoiseAdaptiveContrast(warmup_steps=10)
    loss = plain(image_features=img, text_features=txt[:6], logit_scale=scale, sample_key=keys)
    assert torch.allclose(loss, InfoNCE()(img, txt[:6], scale), atol=TOL, rtol=0)
    owner = torch.arange(6).repeat_interleave(2)
    multi = NoiseAdaptiveContrast(warmup_steps=10, multi_positive=True)
    loss = multi(
        image_features=img, text_features=txt, logit_scale=scale, sample_key=keys, caption_owner=owner
    )
    ref = MultiPositiveInfoNCE()(
        image_features=img, text_features=txt, caption_owner=owner, logit_scale=scale
    )
    assert torch.allclose(loss, ref, atol=TOL, rtol=0)


def test_mixture_fit_and_posterior_match_naive_em():
    rng = random.Random(0)
    values = [rng.gauss(1.0, 0.2) for _ in range(70)] + [rng.gauss(3.0, 0.4) for _ in range(30)]
    lo, hi, m, s, w = naive_em(values)
    assert m[0] < m[1]
    fitted = fit_mixture(torch.tensor(values, dtype=F64))
    want = torch.tensor([lo, hi, *m, *s, *w], dtype=F64)
    assert torch.allclose(fitted, want, atol=1e-12, rtol=0)
    probe = [0.5, 1.0, 2.0, 2.6, 3.5, 6.0]
    eps = noise_probability(torch.tensor(probe, dtype=F64), fitted)
    assert torch.allclose(eps, torch.tensor([naive_posterior(h, lo, hi, m, s, w) for h in probe], dtype=F64))
    # the mispaired third is found: ε > 0.5 on the high-loss mode, < 0.5 on the low one
    found = noise_probability(torch.tensor(values, dtype=F64), fitted) > 0.5
    assert found[70:].float().mean() > 0.9 and found[:70].float().mean() < 0.1


def test_weighted_loss_and_bank_match_a_naive_loop():
    """Five steps of shifting batches (repeats inside a batch, new and known ids): the bank equals a dict
    of EMAs, the mixture is refitted on its cadence, and the loss is Σ w ℓ / Σ w of the loop."""
    objective = NoiseAdaptiveContrast(strength=0.8, momentum=0.6, warmup_steps=2, refit_every=2)
    bank: dict[int, float] = {}
    mixture = None
    for step in range(1, 8):
        keys = torch.tensor([(3 * step + i) % 9 for i in range(5)] + [4])  # id 4 twice in a batch sometimes
        img, txt = unit(6, 4, seed=10 + step), unit(6, 4, seed=20 + step)
        scale = torch.tensor(5.0, dtype=F64, requires_grad=True)
        loss = objective(image_features=img, text_features=txt, logit_scale=scale, sample_key=keys)
        losses = naive_pair_losses(img, txt, scale)
        centre = sum(float(lv.detach()) for lv in losses) / len(losses)
        per_key: dict[int, list[float]] = {}
        for k, lv in zip(keys.tolist(), losses, strict=True):
            per_key.setdefault(k, []).append(float(lv.detach()) - centre)
        for k, ls in per_key.items():
            mean = sum(ls) / len(ls)
            bank[k] = mean if k not in bank else 0.6 * bank[k] + 0.4 * mean
        if step - 1 >= 2 and (step - 1 - 2) % 2 == 0:  # after 2 finished steps, then every 2
            mixture = naive_em([bank[k] for k in sorted(bank)])
        eps = [naive_posterior(bank[k], *mixture) if mixture else 0.0 for k in keys.tolist()]
        w = [1 - 0.8 * e for e in eps]
        slow = sum(wi * li for wi, li in zip(w, losses, strict=True)) / sum(w)
        assert torch.allclose(loss, slow, atol=TOL, rtol=0), step
        g_fast = torch.autograd.grad(loss, (img, txt, scale))
        g_slow = torch.autograd.grad(slow, (img, txt, scale))
        assert all(torch.allclose(a, b, atol=TOL, rtol=0) for a, b in zip(g_fast, g_slow, strict=True))
        assert objective.ids.tolist() == sorted(bank)
        assert torch.allclose(objective.history, torch.tensor([bank[k] for k in sorted(bank)], dtype=F64))
    assert objective.last_stats["noise_mean"] > 0


def test_warmup_counts_finished_steps_and_bad_losses_stay_out():
    """warmup_steps = 0 fits in the first step, W fits in step W + 1; a non-finite loss never reaches the
    bank (a skipped step cannot switch the weighting off), and a never-stored key reads as 0."""
    img, txt, scale = unit(4, 3, seed=7), unit(4, 3, seed=8), torch.tensor(2.0, dtype=F64)
    for warmup, first_fit in ((0, 1), (1, 2), (3, 4)):
        objective = NoiseAdaptiveContrast(warmup_steps=warmup, refit_every=100)
        fitted_at = []
        for step in range(1, 6):
            objective(img, txt, scale, torch.arange(4))
            if objective.mixture.abs().sum() > 0 and not fitted_at:
                fitted_at.append(step)
        assert fitted_at == [first_fit], warmup
    objective = NoiseAdaptiveContrast(warmup_steps=0, refit_every=1)
    bad = torch.tensor([1.0, float("nan"), 3.0, float("inf")], dtype=F64)
    history = objective.remember(torch.tensor([10, 11, 12, 13]), bad)
    assert objective.ids.tolist() == [10, 12] and torch.equal(
        objective.history, torch.tensor([-1.0, 1.0], dtype=F64)
    )
    assert history.tolist() == [-1.0, 0.0, 1.0, 0.0]
    objective(img, txt, scale, torch.arange(4))
    assert torch.isfinite(objective.mixture).all()
    assert sample_ids(["caf\udce9.png"]).shape == (1,)  # a key from a file name that is not UTF-8


def test_state_resumes_exactly_into_a_fresh_objective():
    def batch(step):
        keys = torch.tensor([(5 * step + i) % 13 for i in range(6)])
        return unit(6, 4, seed=step), unit(6, 4, seed=50 + step), torch.tensor(3.0, dtype=F64), keys

    straight = NoiseAdaptiveContrast(warmup_steps=1, refit_every=1)
    losses = [straight(*batch(s)) for s in range(6)]
    first = NoiseAdaptiveContrast(warmup_steps=1, refit_every=1)
    for s in range(3):
        first(*batch(s))
    again = NoiseAdaptiveContrast(warmup_steps=1, refit_every=1)  # an empty bank takes the saved size
    again.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    resumed = [again(*batch(s)) for s in range(3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(losses[3:], resumed, strict=True))
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_options_are_checked_and_sample_ids_are_stable():
    with pytest.raises(UserError, match="strength"):
        build_objective("nevlp", strength=2)
    with pytest.raises(UserError, match="refit_every"):
        build_objective("nevlp", refit_every=0)
    assert "caption_owner" in build_objective("nevlp", multi_positive=True).inputs
    a = sample_ids(["row-1", "row-2", "row-1"])
    assert a.dtype == torch.int64 and a[0] == a[2] != a[1]
    assert torch.equal(a, sample_ids(["row-1", "row-2", "row-1"]))


def test_a_killed_run_resumes_bitwise_with_its_noise_state(table, tmp_path):
    """The real trainer with record keys from the table: straight vs SIGKILLed and resumed — the same
    weights and the same bank and mixture in the last checkpoint's training state."""
    args = {"objective": "nevlp", "objective_args": {"warmup_steps": 2, "refit_every": 3}}
    saved = killed_and_resumed_objective_states(table, tmp_path, **args)
    assert saved[0]["objective.ids"].numel() > 50 and saved[0]["objective.mixture"].abs().sum() > 0
    assert_same(saved[0], saved[1])
