"""Image↔text retrieval recall@K with any number of relevant items per query.

`relevant[t, i]` is True when text t describes image i (one text may describe several images, e.g.
the same concept drawn in several styles). A query counts as a hit at K when any relevant item is
among its K most similar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipkit.data.records import Record


def recall_at_k(
    scores: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """scores, relevant: (Q, N). Returns {"R@k": fraction of queries with a relevant item in the top k}."""
    # stable: tied scores (a caption two images share has one embedding) rank by index on every CPU
    order = scores.argsort(dim=1, descending=True, stable=True)
    hits = relevant.gather(1, order)  # (Q, N) relevance in ranked order
    first = torch.where(hits.any(1), hits.float().argmax(1), torch.full((hits.shape[0],), hits.shape[1]))
    return {f"R@{k}": (first < k).double().mean().item() for k in ks}


def retrieval_scores_metrics(
    text_to_image: torch.Tensor, image_to_text: torch.Tensor, relevant: torch.Tensor
) -> dict[str, float]:
    """Recall@K from ready score matrices, (T, N) for text queries and (N, T) for image queries (they
    differ for an asymmetric similarity such as FILIP's)."""
    out = {f"text_to_image/{k}": v for k, v in recall_at_k(text_to_image, relevant).items()}
    out.update({f"image_to_text/{k}": v for k, v in recall_at_k(image_to_text, relevant.t()).items()})
    return out


def retrieval_chance(relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall@k of a random ranking: 1 − C(N−r, k)/C(N, k), averaged over queries."""
    out = {}
    for name, rel in (("text_to_image", relevant), ("image_to_text", relevant.t())):
        n = rel.shape[1]
        r = rel.sum(1).double()
        for k in ks:
            miss = torch.ones_like(r)
            for j in range(min(k, n)):  # probability that none of the first k picks is relevant
                miss = miss * ((n - r - j) / (n - j)).clamp(min=0)
            out[f"{name}/R@{k}"] = (1 - miss).mean().item()
    return out


@dataclass
class RetrievalTexts:
    """The split's distinct retrieval captions and which images each describes."""

    captions: list[str]  # per image, its `eval.retrieval_caption`
    texts: list[str]  # distinct, sorted
    index: dict[str, int]  # text → its row
    relevant: torch.Tensor  # (T, N)

    @classmethod
    def of(cls, records: Sequence[Record], which: int, every_caption: bool = False) -> RetrievalTexts:
        """lipkit: caption `which` of each image, distinct texts relevant to every image that has them;
        `every_caption` (CLIP_benchmark): every caption of every image, each relevant to its image only."""
        captions = [r.captions[min(which, len(r.captions) - 1)] if r.captions else "" for r in records]
        if every_caption:
            owners = [i for i, r in enumerate(records) for _ in r.captions]
            texts = [c for r in records for c in r.captions]
            index = {t: i for i, t in reversed(list(enumerate(texts)))}  # a text's first row
            rows = torch.arange(len(texts))
        else:
            texts = sorted(set(captions))
            index = {t: i for i, t in enumerate(texts)}
            owners = list(range(len(records)))
            rows = torch.tensor([index[c] for c in captions])
        relevant = torch.zeros(len(texts), len(records), dtype=torch.bool)
        relevant[rows, torch.tensor(owners)] = True
        return cls(captions, texts, index, relevant)
