"""DreamLIP's sub-caption grouping loss against a naive per-caption loop (float64, values and gradients),
its neutral weight (multi-positive exactly) and its threshold; training end to end is in
tests/test_objectives_training.py and two ranks against one process in tests/test_distributed.py."""

import pytest
import torch

from lipkit.errors import UserError
from lipkit.objectives import build_objective
from lipkit.objectives.dreamlip import SubCaptionGrouping, grouped_patches
from lipkit.objectives.multi_positive import MultiPositiveInfoNCE
from test_objectives import assert_same_value_and_grads, log_scale, unit

OWNER = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # two sub-captions per image, image-major


def naive_grouping(img_tokens, txt, scale, owner, threshold):
    n = txt.shape[0]
    grouped = []
    for j in range(n):
        patches = img_tokens[int(owner[j])]
        s = [torch.dot(txt[j], patches[p]) for p in range(patches.shape[0])]
        lo, hi = min(s), max(s)
        w = [(x - lo) / (hi - lo + 1e-10) for x in s]
        w = [x if x >= threshold else x * 0 for x in w]
        g = sum(w[p] * patches[p] for p in range(len(w))) / sum(w)
        grouped.append(g / torch.sqrt((g * g).sum()))
    total = 0.0
    for j in range(n):
        g2t = torch.stack([scale * torch.dot(grouped[j], txt[m]) for m in range(n)])
        t2g = torch.stack([scale * torch.dot(txt[j], grouped[m]) for m in range(n)])
        total = total - (g2t[j] - torch.logsumexp(g2t, 0)) - (t2g[j] - torch.logsumexp(t2g, 0))
    return 0.5 * total / n


@pytest.mark.parametrize("weight, threshold", [(1.0, 0.0), (0.5, 0.4)])
def test_dreamlip_matches_naive_loop(weight, threshold):
    img, txt, t = unit(4, 5, seed=920), unit(8, 5, seed=921), log_scale()
    tokens = unit(4, 6, 5, seed=922)
    fast = SubCaptionGrouping(weight, threshold)(img, txt, OWNER, t.exp(), tokens)
    mp = MultiPositiveInfoNCE()(img, txt, OWNER, t.exp())
    slow = mp + weight * naive_grouping(tokens, txt, t.exp(), OWNER, threshold)
    assert_same_value_and_grads(fast, slow, (img, txt, t, tokens))


def test_dreamlip_neutral_threshold_and_gradcheck():
    img, txt, t = unit(4, 5, seed=930), unit(8, 5, seed=931), log_scale()
    tokens = unit(4, 6, 5, seed=932)
    off = SubCaptionGrouping(grouping_weight=0)(img, txt, OWNER, t.exp(), tokens)
    assert_same_value_and_grads(off, MultiPositiveInfoNCE()(img, txt, OWNER, t.exp()), (img, txt, t))
    # δ just under 1 keeps only each caption's best patch: the group is that patch
    best = grouped_patches(txt, tokens[OWNER], 0.999)
    top = torch.einsum("td,tmd->tm", txt, tokens[OWNER]).argmax(1)
    assert torch.allclose(best, tokens[OWNER][torch.arange(8), top], atol=1e-12)
    assert torch.autograd.gradcheck(lambda c, v: grouped_patches(c, v[OWNER], 0.3), (txt, tokens))
    for bad in ({"grouping_weight": -1}, {"threshold": 1}, {"threshold": True}):
        with pytest.raises(UserError, match="Objective 'dreamlip'"):
            build_objective("dreamlip", **bad)
