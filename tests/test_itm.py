"""UNITER's image–text matching (models/matching_head.py, objectives/itm.py): hard negatives against a
brute-force search, the loss against a per-pair loop (values and gradients), padding that changes nothing,
and training a head beside InfoNCE or alone on a frozen checkpoint."""

import math

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import UserError
from lipkit.models.matching_head import MatchingHead
from lipkit.objectives import build_objective
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.itm import hard_negatives

F64 = torch.float64


def head(dim=8, layers=2, seed=0) -> MatchingHead:
    torch.manual_seed(seed)
    return MatchingHead(dim, 12, layers, 2).double().eval()


def unit(*shape, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).requires_grad_(grad)


def test_padding_tokens_change_nothing_and_both_sides_count():
    h = head()
    img, txt = unit(3, 4, 8, seed=1), unit(3, 6, 8, seed=2)
    mask = torch.arange(6)[None] < torch.tensor([[2], [6], [4]])
    out = h(img, txt, mask)
    noisy = torch.where(mask[..., None], txt, unit(3, 6, 8, seed=3))
    assert torch.allclose(h(img, noisy, mask), out, atol=1e-12)
    for b in range(3):  # alone, cut to its own length: the same score
        n = int(mask[b].sum())
        assert torch.allclose(h(img[b : b + 1], txt[b : b + 1, :n], mask[b : b + 1, :n]), out[b : b + 1])
    assert not torch.allclose(h(img.flip(0), txt, mask), out)
    assert not torch.allclose(h(img, txt.flip(0), mask.flip(0)), out)


def brute_negatives(sims, keys):
    b = sims.shape[0]
    text, image = [], []
    for i in range(b):
        cands = [(float(sims[i, j]), -j) for j in range(b) if keys[j] != keys[i]]
        text.append(-max(cands)[1] if cands else -1)
    for j in range(b):
        cands = [(float(sims[i, j]), -i) for i in range(b) if keys[i] != keys[j]]
        image.append(-max(cands)[1] if cands else -1)
    return text, image


def test_hard_negatives_match_a_brute_force_search():
    g = torch.Generator().manual_seed(4)
    for keys in ([0, 1, 2, 3, 4], [7, 7, 1, 2, 7], [5, 5, 5, 5, 5]):
        sims = torch.randn(5, 5, generator=g, dtype=F64)
        got = hard_negatives(sims, torch.tensor(keys))
        want = brute_negatives(sims, keys)
        assert [got[0].tolist(), got[1].tolist()] == [want[0], want[1]], keys
    assert hard_negatives(sims, torch.tensor([5] * 5))[0].tolist() == [-1] * 5  # all one caption: none


def naive_loss(img_f, txt_f, scale, img_t, txt_t, mask, keys, h, lam, w, sampled=False):
    """Per pair: the head on that pair alone (its caption cut to its length), BCE, mean over the pairs;
    the hardest negatives by brute force, or ALBEF's draw (checked on its own below)."""
    sims = img_f.detach() @ txt_f.detach().t()
    if sampled:
        text_neg, image_neg = (x.tolist() for x in hard_negatives(sims, keys, float(scale)))
    else:
        text_neg, image_neg = brute_negatives(sims, keys.tolist())
    pairs = [(i, i, 1.0) for i in range(len(keys))]
    pairs += [(i, j, 0.0) for i, j in enumerate(text_neg) if j >= 0]
    pairs += [(i, j, 0.0) for j, i in enumerate(image_neg) if i >= 0]
    total = 0
    for i, j, y in pairs:
        n = int(mask[j].sum())
        s = h(img_t[i : i + 1], txt_t[j : j + 1, :n], mask[j : j + 1, :n])[0]
        total = total - (y * F.logsigmoid(s) + (1 - y) * F.logsigmoid(-s))
    return lam * total / len(pairs) + w * InfoNCE()(img_f, txt_f, scale)


@pytest.mark.parametrize("negatives", ["hardest", "sampled"])
@pytest.mark.parametrize("keys", [[0, 1, 2, 3, 4, 5], [3, 3, 1, 2, 3, 9]])
def test_objective_matches_a_per_pair_loop_values_and_gradients(keys, negatives):
    h = head()
    img_f, txt_f = unit(6, 8, seed=5, grad=True), unit(6, 8, seed=6, grad=True)
    img_t, txt_t = unit(6, 4, 8, seed=7, grad=True), unit(6, 5, 8, seed=8, grad=True)
    mask = torch.arange(5)[None] < torch.tensor([[2], [5], [3], [4], [2], [3]])
    scale, keys = torch.tensor(10.0, dtype=F64), torch.tensor(keys)
    obj = build_objective("itm", match_weight=1.5, contrastive_weight=0.5, negatives=negatives)
    got = obj(img_f, txt_f, scale, img_t, txt_t, mask, keys, h)
    want = naive_loss(img_f, txt_f, scale, img_t, txt_t, mask, keys, h, 1.5, 0.5, negatives == "sampled")
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-10)
    leaves = [img_f, txt_f, img_t, txt_t, *h.parameters()]
    g1 = torch.autograd.grad(got, leaves)
    g2 = torch.autograd.grad(want, leaves)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2, strict=True))
    assert g1[2].abs().sum() > 0 and g1[3].abs().sum() > 0  # the tokens learn from the head
    assert set(obj.last_stats) == {"match_loss", "match_accuracy"}


def test_objective_options_are_checked():
    with pytest.raises(UserError, match="match_weight"):
        build_objective("itm", match_weight=-1)
    with pytest.raises(UserError, match="contrastive_weight"):
        build_objective("itm", contrastive_weight="a lot")
    with pytest.raises(UserError, match="ot_weight"):
        build_objective("itm", ot_weight=float("nan"))
    with pytest.raises(UserError, match="head_lr_scale"):
        build_objective("itm", head_lr_scale=0)
    assert build_objective("itm").lr_scales == {"matcher.": 0.1}


def ipot_loop(cost, rows, cols, beta, iterations):
    """IPOT for one pair in plain Python over its real rows and columns (lists, no tensors)."""
    r = [i for i in range(len(rows)) if rows[i]]
    c = [j for j in range(len(cols)) if cols[j]]
    a, b = 1 / len(r), 1 / len(c)
    g = {(i, j): math.exp(-float(cost[i][j]) / beta) for i in r for j in c}
    t = {(i, j): 1.0 for i in r for j in c}
    u = {i: a for i in r}
    for _ in range(iterations):
        q = {key: g[key] * t[key] for key in g}
        v = {j: b / sum(q[i, j] * u[i] for i in r) for j in c}
        u = {i: a / sum(q[i, j] * v[j] for j in c) for i in r}
        t = {(i, j): u[i] * q[i, j] * v[j] for i, j in q}
    return [[t.get((i, j), 0.0) for j in range(len(cols))] for i in range(len(rows))]


def test_ipot_matches_a_per_pair_loop_with_padding():
    from lipkit.objectives.optimal_transport import ipot_plan

    g = torch.Generator().manual_seed(9)
    cost = 1 - torch.rand(3, 5, 4, generator=g, dtype=F64)
    rows = torch.arange(5)[None] < torch.tensor([[2], [5], [3]])
    cols = torch.ones(3, 4, dtype=torch.bool)
    cols[2, 3] = False
    plan = ipot_plan(cost, rows, cols, beta=0.5, iterations=7)
    for p in range(3):
        want = torch.tensor(
            ipot_loop(cost[p].tolist(), rows[p].tolist(), cols[p].tolist(), 0.5, 7), dtype=F64
        )
        assert torch.allclose(plan[p], want, atol=1e-12)
    want_rows = (1 / rows.sum(1, keepdim=True).double()).expand(3, 5)  # the last scaling makes rows exact
    assert torch.allclose(plan.sum(2)[rows], want_rows[rows], atol=1e-12) and (plan[~rows] == 0).all()


def test_ipot_converges_to_the_exact_distance_of_a_brute_force_assignment():
    """Uniform marginals over n words and n patches: an optimal plan is a permutation (Birkhoff), so the exact
    distance is the best of the n! assignments."""
    import itertools

    from lipkit.objectives.optimal_transport import ipot_plan

    g = torch.Generator().manual_seed(10)
    for n in (3, 5):
        cost = torch.rand(1, n, n, generator=g, dtype=F64) * 2
        exact = min(
            sum(float(cost[0, i, s[i]]) for i in range(n)) / n for s in itertools.permutations(range(n))
        )
        ones = torch.ones(1, n, dtype=torch.bool)
        approx = float((cost * ipot_plan(cost, ones, ones, beta=0.5, iterations=2000)).sum())
        assert approx == pytest.approx(exact, abs=1e-6), n
        fifty = float((cost * ipot_plan(cost, ones, ones, beta=0.5, iterations=50)).sum())
        assert exact - 1e-9 <= fifty <= exact + 0.05  # UNITER's 50 steps: a feasible plan, near the optimum


def test_the_ot_term_pulls_true_pairs_and_pushes_negatives_as_a_loop_says():
    from lipkit.objectives.optimal_transport import ipot_plan

    h = head()
    img_f, txt_f = unit(5, 8, seed=11, grad=True), unit(5, 8, seed=12, grad=True)
    img_t, txt_t = unit(5, 4, 8, seed=13, grad=True), unit(5, 5, 8, seed=14, grad=True)
    mask = torch.arange(5)[None] < torch.tensor([[2], [5], [3], [4], [1]])
    scale, keys = torch.tensor(10.0, dtype=F64), torch.arange(5)
    base = build_objective("itm", negatives="hardest")(img_f, txt_f, scale, img_t, txt_t, mask, keys, h)
    obj = build_objective("itm", ot_weight=0.1, negatives="hardest")
    got = obj(img_f, txt_f, scale, img_t, txt_t, mask, keys, h)
    text_neg, image_neg = brute_negatives(img_f.detach() @ txt_f.detach().t(), keys.tolist())
    pairs = [(i, i, 1) for i in range(5)] + [(i, j, 0) for i, j in enumerate(text_neg)]
    pairs += [(i, j, 0) for j, i in enumerate(image_neg)]
    total = 0
    for i, j, y in pairs:  # each pair alone: its words' real rows, every patch
        n = int(mask[j].sum())
        cost = 1 - txt_t[j, :n] @ img_t[i].t()
        plan = torch.tensor(ipot_loop(cost.tolist(), [True] * n, [True] * 4, 0.5, 50), dtype=F64)
        total = total + (1 if y else -1) * (cost * plan).sum()
    want = base + 0.1 * total / len(pairs)
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-10)
    g1 = torch.autograd.grad(got, [img_t, txt_t], retain_graph=True)
    g2 = torch.autograd.grad(want, [img_t, txt_t])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2, strict=True))
    assert set(obj.last_stats) >= {"ot_positive", "ot_negative"} and ipot_plan is not None


def test_sampled_negatives_follow_the_softmax_of_the_scaled_cosines():
    """ALBEF's draw: never an identical caption, the same draw for the same batch, and over many batches
    (seeds from their keys) each candidate as often as exp(t·c) says."""
    sims = torch.tensor(
        [[0.9, 0.5, 0.2, 0.1], [0.3, 0.8, 0.6, 0.0], [0.1, 0.2, 0.7, 0.4], [0.2, 0.1, 0.3, 0.9]]
    )
    counts = torch.zeros(4, 4)
    for trial in range(3000):
        keys = torch.tensor(
            [trial * 4 + 1, trial * 4 + 2, trial * 4 + 1, trial * 4 + 3]
        )  # captions 0, 2 equal
        text_neg, image_neg = hard_negatives(sims, keys, scale=3.0)
        assert torch.equal(text_neg, hard_negatives(sims, keys, scale=3.0)[0])
        assert all(keys[j] != keys[i] for i, j in enumerate(text_neg.tolist()))
        assert all(keys[i] != keys[j] for j, i in enumerate(image_neg.tolist()))
        counts[0, text_neg[0]] += 1
    allowed = torch.tensor([1, 3])  # image 0's caption is caption 2's too: 1 and 3 remain
    want = torch.softmax(3.0 * sims[0, allowed], 0)
    assert torch.allclose(counts[0, allowed] / 3000, want, atol=0.03)
    with pytest.raises(UserError, match="negatives"):
        build_objective("itm", negatives="random")


def test_the_head_learns_at_its_own_rate():
    from lipkit.config import TrainConfig
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.train.optim import build_optimizer

    model = DualEncoder(get_spec("tiny", vocab_size=50, eot_id=2, image_size=32, match_layers=1))
    opt, _, _ = build_optimizer(
        model, build_objective("itm", head_lr_scale=0.25), TrainConfig(), torch.device("cpu"), 0
    )
    head = {id(p) for p in model.matcher.parameters()}
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr_scale"] == (0.25 if in_head == {True} else 1.0)
    assert any(
        id(p) in head for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
    )  # cls, types
