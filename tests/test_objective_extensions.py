"""ALIP's moving-average means, UniME's hard negatives with false-negative filtering and Wukong's
reduced-token interaction against naive per-pair loops (float64, values and gradients), and each at its
neutral option equal to the method it extends."""

import math

import pytest
import torch

from lipkit.objectives.alip import ALIPLoss
from lipkit.objectives.filip import FILIPLoss
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.unime import HardNegativeContrast
from lipkit.objectives.wukong import ReducedTokenInteraction, kept_tokens
from test_objectives import (
    F64,
    TOL,
    assert_same_value_and_grads,
    filip_inputs,
    log_scale,
    naive_filip_loss,
    naive_weighted_clip,
    unit,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- ALIP with moving-average means ----------------------------------------------------------------


def naive_alip_step(img, raw, syn, gamma, means, momentum):
    """One step by hand: the means updated with the batch means, then the gates against them."""
    n = img.shape[0]
    dot = lambda a, b: float(torch.dot(a.detach(), b.detach()))  # noqa: E731
    sims = [[dot(raw[i], syn[i]) for i in range(n)]]
    sims += [[dot(img[i], raw[i]) for i in range(n)], [dot(img[i], syn[i]) for i in range(n)]]
    means = [momentum * m + (1 - momentum) * sum(s) / n for m, s in zip(means, sims, strict=True)]
    (a, b, e), (ma, mb, me) = sims, means
    w, v = [], []
    for i in range(n):
        sample = min(1.0, math.exp(gamma * (a[i] - ma)))
        gated = sample < 1
        w.append(sample * (math.exp(gamma * (b[i] - mb)) if gated else 1.0))
        v.append(sample * (math.exp(gamma * (e[i] - me)) if gated else 1.0))
    return w, v, means


def alip_batch(step: int):
    return unit(8, 4, seed=300 + step), unit(8, 4, seed=310 + step), unit(8, 4, seed=320 + step)


@pytest.mark.parametrize("momentum,initial", [(0.9, 1.0), (0.5, 0.2), (0.0, 1.0)])
def test_alip_moving_means_match_naive_loop_over_steps(momentum, initial):
    loss_fn = ALIPLoss(gamma=2.0, momentum=momentum, initial=initial)
    means = [initial] * 3
    for step in range(3):
        img, raw, syn = alip_batch(step)
        t = log_scale()
        w, v, means = naive_alip_step(img, raw, syn, 2.0, means, momentum)
        fast = loss_fn(image_features=img, text_features=raw, synth_features=syn, logit_scale=t.exp())
        slow = 0.5 * (naive_weighted_clip(img, raw, t.exp(), w) + naive_weighted_clip(img, syn, t.exp(), v))
        assert_same_value_and_grads(fast, slow, (img, raw, syn, t))
        assert torch.allclose(loss_fn.means, torch.tensor(means, dtype=F64), atol=TOL, rtol=0)


def test_alip_momentum_zero_is_the_batch_mean_loss():
    """μ = 0 is the loss before the moving averages (the batch weighs its samples against itself)."""
    from lipkit.objectives.alip import alip_weights, weighted_clip_loss

    img, raw, syn = alip_batch(0)
    t = log_scale()
    w, v = alip_weights(img, raw, syn, 2.0)  # means None: the batch's own
    before = 0.5 * (weighted_clip_loss(img, raw, t.exp(), w) + weighted_clip_loss(img, syn, t.exp(), v))
    after = ALIPLoss(gamma=2.0, momentum=0.0)(img, raw, syn, t.exp())
    assert_same_value_and_grads(after, before, (img, raw, syn, t))


def test_alip_means_resume_exactly_and_evaluation_stores_nothing():
    first = ALIPLoss(momentum=0.9)
    for step in range(2):
        first(*alip_batch(step), log_scale().exp())
    resumed = ALIPLoss(momentum=0.9)
    resumed.load_state_dict(first.state_dict())
    img, raw, syn = alip_batch(2)
    assert torch.equal(first(img, raw, syn, log_scale().exp()), resumed(img, raw, syn, log_scale().exp()))
    assert torch.equal(first.means, resumed.means)
    stored = first.means.clone()
    first.eval()
    first(*alip_batch(3), log_scale().exp())
    assert torch.equal(first.means, stored)
    with pytest.raises(ValueError, match="momentum"):
        ALIPLoss(momentum=1.0)


# --- UniME: hard negatives, false negatives filtered ------------------------------------------------


def naive_unime(img, txt, keys, scale, threshold, k):
    """Each query's negatives by hand: not a copy of its caption, not above positive + β, the K most similar."""
    n = img.shape[0]
    sims = [[torch.dot(img[i], txt[j]) for j in range(n)] for i in range(n)]

    def direction(s):  # s[q][c]: query q against candidate c
        total = 0.0
        for q in range(n):
            cands = [c for c in range(n) if c != q and int(keys[c]) != int(keys[q])]
            if threshold is not None:
                cands = [c for c in cands if s[q][c].item() <= s[q][q].item() + threshold]
            cands.sort(key=lambda c: (-s[q][c].item(), c))
            if k is not None:
                cands = cands[:k]
            logits = torch.stack([scale * s[q][q]] + [scale * s[q][c] for c in cands])
            total = total - (logits[0] - torch.logsumexp(logits, 0))
        return total / n

    transposed = [[sims[i][j] for i in range(n)] for j in range(n)]
    return 0.5 * (direction(sims) + direction(transposed))


def unime_batch(seed: int):
    img, txt = unit(8, 3, seed=seed), unit(8, 3, seed=seed + 1)
    keys = torch.tensor([0, 1, 2, 3, 1, 5, 6, 2])  # pairs 1 and 4, 2 and 7 have the same caption
    return img, txt, keys


@pytest.mark.parametrize("threshold,k", [(0.1, 3), (0.1, None), (None, 2), (-0.2, 8), (0.0, 1)])
def test_unime_matches_naive_loop(threshold, k):
    img, txt, keys = unime_batch(400)
    t = log_scale()
    fast = HardNegativeContrast(threshold, k)(img, txt, t.exp(), text_key=keys)
    slow = naive_unime(img, txt, keys, t.exp(), threshold, k)
    assert_same_value_and_grads(fast, slow, (img, txt, t))


def test_unime_filter_bites_and_neutral_values_are_infonce():
    img, txt, keys = unime_batch(410)
    t = log_scale()
    distinct = torch.arange(8) * 7
    plain = InfoNCE()(img, txt, t.exp())
    neutral = HardNegativeContrast(None, None)(img, txt, t.exp(), text_key=distinct)
    assert_same_value_and_grads(neutral, plain, (img, txt, t))
    # with repeated captions the copies leave the softmax, and a tight threshold and small K change the loss
    copies = HardNegativeContrast(None, None)(img, txt, t.exp(), text_key=keys)
    assert copies.item() < plain.item() - 1e-6
    for threshold, k in [(-0.5, None), (None, 1)]:
        changed = HardNegativeContrast(threshold, k)(img, txt, t.exp(), text_key=distinct)
        assert abs(changed.item() - plain.item()) > 1e-6


def test_unime_gradcheck_and_options():
    img, txt, keys = unit(5, 3, seed=420), unit(5, 3, seed=421), torch.tensor([0, 1, 0, 3, 4])
    loss = HardNegativeContrast(0.1, 2)
    assert torch.autograd.gradcheck(
        lambda x, y, s: loss(x, y, s.exp(), text_key=keys), (img, txt, log_scale())
    )
    with pytest.raises(ValueError, match="hard_negatives"):
        HardNegativeContrast(hard_negatives=0)


# --- Wukong: reduced-token interaction --------------------------------------------------------------


def naive_kept(img, k):
    """Per image by hand: tokens ranked by similarity to the mean token (ties to the earlier), top k, in order."""
    out = []
    for tokens in img:
        mean = torch.stack(list(tokens)).mean(0).detach()
        scores = [float(torch.dot(x.detach(), mean)) for x in tokens]
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        out.append(torch.stack([tokens[i] for i in sorted(ranked)]))
    return torch.stack(out)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_wukong_matches_naive_loop(k):
    img, txt, mask = filip_inputs(5, 5, 6, 4, 3, seed=500)
    t = log_scale()
    fast = ReducedTokenInteraction(image_tokens_kept=k)(img, txt, t.exp(), text_mask=mask)
    slow = naive_filip_loss(naive_kept(img, k), txt, mask, t.exp())
    assert_same_value_and_grads(fast, slow, (img, txt, t))


@pytest.mark.parametrize("k", [None, 6, 50])
def test_wukong_with_every_token_is_filip(k):
    img, txt, mask = filip_inputs(4, 4, 6, 5, 3, seed=510)
    t = log_scale()
    fast = ReducedTokenInteraction(image_tokens_kept=k)(img, txt, t.exp(), text_mask=mask)
    assert_same_value_and_grads(fast, FILIPLoss()(img, txt, t.exp(), text_mask=mask), (img, txt, t))


def test_wukong_keeps_tokens_in_order_and_breaks_ties_by_position():
    tokens = torch.ones(1, 4, 2, dtype=F64)
    tokens[0, :, 1] = torch.tensor([0.5, -0.5, 0.3, -0.3], dtype=F64)  # mean (1, 0): every score is exactly 1
    assert torch.equal(kept_tokens(tokens, 2)[0, :, 1], torch.tensor([0.5, -0.5], dtype=F64))
    tokens[0, :, 1] = torch.tensor([0.0, 3e-3, 0.0, 2e-3], dtype=F64)  # the two largest, kept in token order
    assert torch.equal(kept_tokens(tokens, 2)[0, :, 1], torch.tensor([3e-3, 2e-3], dtype=F64))
    with pytest.raises(ValueError, match="image_tokens_kept"):
        ReducedTokenInteraction(image_tokens_kept=0)


# --- Improved baselines: label smoothing, SimCLR and Barlow Twins image terms ------------------------


def naive_smoothed_clip(img, txt, scale, eps):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(n)])
        col = torch.stack([scale * torch.dot(img[j], txt[i]) for j in range(n)])
        for j in range(n):
            q = (1 - eps) * (i == j) + eps / n
            total = total - q * (row[j] - torch.logsumexp(row, 0)) - q * (col[j] - torch.logsumexp(col, 0))
    return 0.5 * total / n


def naive_simclr(a, b, tau):
    z = list(a) + list(b)
    n, total = a.shape[0], 0.0
    for k in range(2 * n):
        partner = k + n if k < n else k - n
        others = torch.stack([torch.dot(z[k], z[m]) / tau for m in range(2 * n) if m != k])
        total = total - (torch.dot(z[k], z[partner]) / tau - torch.logsumexp(others, 0))
    return total / (2 * n)


def naive_barlow(a, b, lam):
    n, d = a.shape

    def standard(x, col):
        values = [x[i, col] for i in range(n)]
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / n
        return [(v - mean) / torch.sqrt(var + 1e-5) for v in values]

    sa, sb = [standard(a, c) for c in range(d)], [standard(b, c) for c in range(d)]
    total = 0.0
    for p in range(d):
        for q in range(d):
            c = sum(sa[p][i] * sb[q][i] for i in range(n)) / n
            total = total + ((1 - c) ** 2 if p == q else lam * c**2)
    return total


@pytest.mark.parametrize("ssl", ["none", "simclr", "barlow_twins"])
def test_improved_baselines_match_naive_loops(ssl):
    from lipkit.objectives.improved_baselines import ImprovedBaselines

    img, txt, img2 = unit(6, 4, seed=600), unit(6, 4, seed=601), unit(6, 4, seed=602)
    t = log_scale()
    loss = ImprovedBaselines(
        label_smoothing=0.2, image_ssl=ssl, ssl_weight=0.7, ssl_temperature=0.3, barlow_lambda=0.05
    )
    fast = loss(img, txt, t.exp(), image_features_2=img2)
    slow = naive_smoothed_clip(img, txt, t.exp(), 0.2)
    if ssl == "simclr":
        slow = slow + 0.7 * naive_simclr(img, img2, 0.3)
    elif ssl == "barlow_twins":
        slow = slow + 0.7 * naive_barlow(img, img2, 0.05)
    assert_same_value_and_grads(fast, slow, (img, txt, img2, t) if ssl != "none" else (img, txt, t))
    assert ("image_features_2" in loss.inputs) == (ssl != "none")


def test_improved_baselines_neutral_is_infonce_and_options_are_checked():
    from lipkit.objectives.improved_baselines import ImprovedBaselines

    img, txt, t = unit(5, 3, seed=610), unit(5, 3, seed=611), log_scale()
    neutral = ImprovedBaselines(label_smoothing=0.0)(img, txt, t.exp())
    assert_same_value_and_grads(neutral, InfoNCE()(img, txt, t.exp()), (img, txt, t))
    for bad in ({"image_ssl": "mae"}, {"label_smoothing": 1.0}, {"ssl_temperature": 0.0}):
        with pytest.raises(ValueError):
            ImprovedBaselines(**bad)
    img2 = unit(5, 3, seed=612)
    assert torch.autograd.gradcheck(
        lambda x, y, z, s: ImprovedBaselines(image_ssl="barlow_twins")(x, y, s.exp(), image_features_2=z),
        (img, txt, img2, log_scale()),
    )


def test_alip_a_non_finite_batch_leaves_the_means_alone():
    """A NaN batch (whose step the trainer skips) never enters the moving means, so the next step — with
    μ = 0 too — is exactly what it would have been without it."""
    for momentum in (0.0, 0.9):
        clean, hit = ALIPLoss(momentum=momentum), ALIPLoss(momentum=momentum)
        clean(*alip_batch(0), log_scale().exp())
        hit(*alip_batch(0), log_scale().exp())
        img, raw, syn = (x.detach().clone() for x in alip_batch(1))
        img[0, 0] = float("nan")
        assert not torch.isfinite(hit(img, raw, syn, log_scale().exp()))
        assert torch.equal(hit.means, clean.means)
        after = [loss(*alip_batch(2), log_scale().exp()) for loss in (clean, hit)]
        assert torch.equal(after[0], after[1])


def test_wukong_gradcheck():
    img, txt, mask = filip_inputs(3, 3, 5, 4, 3, seed=520)
    loss = ReducedTokenInteraction(image_tokens_kept=2)
    assert torch.autograd.gradcheck(
        lambda x, y, s: loss(x, y, s.exp(), text_mask=mask), (img, txt, log_scale())
    )


def test_option_types_are_checked():
    from lipkit.objectives.improved_baselines import ImprovedBaselines

    for make in (
        lambda: ALIPLoss(momentum="0.9"),
        lambda: HardNegativeContrast(hard_negatives=2.5),
        lambda: HardNegativeContrast(threshold="high"),
        lambda: ReducedTokenInteraction(image_tokens_kept=2.5),
        lambda: ImprovedBaselines(ssl_weight=-1.0),
    ):
        with pytest.raises(ValueError):
            make()
