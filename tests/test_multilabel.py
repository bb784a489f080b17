"""Multi-label zero-shot: average precision against a per-rank loop (and scikit-learn's where installed),
mAP over the classes of a list-valued column, chance as the mean class prevalence."""

from __future__ import annotations

import random

import pytest
import torch

from lipkit.eval.multilabel import average_precision, multilabel_zeroshot


def naive_ap(scores: list[float], positive: list[bool]) -> float:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    found, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            found += 1
            total += found / rank
    return total / found


def test_average_precision_matches_a_loop_with_ties():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 30)
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]  # ties on purpose
        positive = [rng.random() < 0.4 for _ in range(n)]
        positive[rng.randrange(n)] = True
        got = average_precision(torch.tensor(scores, dtype=torch.float64), torch.tensor(positive))
        assert got == pytest.approx(naive_ap(scores, positive), abs=1e-12)


def test_average_precision_agrees_with_scikit_learn_without_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(1)
    scores, positive = torch.rand(40, generator=g, dtype=torch.float64), torch.rand(40, generator=g) < 0.3
    want = metrics.average_precision_score(positive.numpy(), scores.numpy())
    assert average_precision(scores, positive) == pytest.approx(want, abs=1e-12)


def test_multilabel_zeroshot_is_the_mean_ap_over_classes_with_chance_the_prevalence():
    values = [["cat", "dog"], ["dog"], ["bird", "cat"], []]
    scores = torch.tensor(
        [[0.9, 0.8, 0.1], [0.2, 0.1, 0.7], [0.5, 0.6, 0.3], [0.4, 0.3, 0.2]]
    )  # bird cat dog
    metrics, chance = {}, {}
    multilabel_zeroshot(lambda classes: scores[:, : len(classes)], values, "animal", metrics, chance)
    aps = [
        naive_ap(scores[:, c].tolist(), [cls in v for v in values])
        for c, cls in enumerate(["bird", "cat", "dog"])
    ]
    assert metrics["zeroshot/animal/mAP"] == pytest.approx(sum(aps) / 3)
    assert chance["zeroshot/animal/mAP"] == pytest.approx((1 / 4 + 2 / 4 + 2 / 4) / 3)
    perfect = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    multilabel_zeroshot(lambda classes: perfect, values, "animal", metrics, chance)
    assert metrics["zeroshot/animal/mAP"] == 1.0
