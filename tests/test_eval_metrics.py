import itertools
import math

import torch
import torch.nn.functional as F

from lipkit.eval.retrieval import recall_at_k, retrieval_chance
from lipkit.eval.zeroshot import class_embeddings, zeroshot_metrics


def test_recall_matches_naive_with_multiple_relevant():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(30, 40, generator=g)
    relevant = torch.rand(30, 40, generator=g) < 0.05
    relevant[0] = False  # a query with nothing relevant never counts as a hit
    got = recall_at_k(scores, relevant, ks=(1, 5, 10))
    for k in (1, 5, 10):
        hits = 0
        for q in range(30):
            ranked = sorted(range(40), key=lambda i: -scores[q, i].item())[:k]
            hits += any(relevant[q, i] for i in ranked)
        assert math.isclose(got[f"R@{k}"], hits / 30)


def test_retrieval_chance_matches_enumeration():
    relevant = torch.zeros(2, 6, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 1] = relevant[1, 2] = True
    chance = retrieval_chance(relevant, ks=(1, 2))
    # text 0: 1 of 6 relevant; text 1: 2 of 6. Enumerate all orderings' first-k sets.
    for k in (1, 2):
        probs = []
        for q in range(2):
            subsets = list(itertools.combinations(range(6), k))
            probs.append(sum(any(relevant[q, i] for i in s) for s in subsets) / len(subsets))
        assert math.isclose(chance[f"text_to_image/R@{k}"], sum(probs) / 2, rel_tol=1e-9)


def test_zeroshot_naive():
    g = torch.Generator().manual_seed(2)
    prompts = F.normalize(torch.randn(4 * 3, 8, generator=g), dim=-1)
    cls = class_embeddings(prompts, 4, 3)
    for c in range(4):
        ref = F.normalize(prompts[3 * c : 3 * c + 3].mean(0), dim=-1)
        assert torch.allclose(cls[c], ref, atol=1e-6)
    img = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    labels = torch.randint(0, 4, (20,), generator=g)
    m = zeroshot_metrics(img, cls, labels)
    pred = [(img[i] @ cls.t()).argmax().item() for i in range(20)]
    assert math.isclose(m["top1"], sum(p == y for p, y in zip(pred, labels.tolist(), strict=True)) / 20)
    assert m["top5"] == 1.0  # only 4 classes
    recalls = [
        sum(p == c for p, y in zip(pred, labels.tolist(), strict=True) if y == c)
        / sum(y == c for y in labels.tolist())
        for c in set(labels.tolist())
    ]
    assert math.isclose(m["mean_recall"], sum(recalls) / len(recalls), rel_tol=1e-6)
