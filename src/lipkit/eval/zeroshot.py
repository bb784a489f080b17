"""Zero-shot classification as in CLIP: each class is the mean of its prompt-template text embeddings
(re-normalised); an image is assigned the class with the highest cosine similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_embeddings(text_features: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(C·T, D) normalised prompt embeddings, class-major → (C, D) normalised class embeddings."""
    return F.normalize(text_features.view(n_classes, n_templates, -1).mean(1), dim=-1)


def zeroshot_metrics(
    image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """top-1, top-5 accuracy and mean per-class recall (over the classes present in `labels`)."""
    return zeroshot_scores_metrics(image_features @ class_features.t(), labels)


def zeroshot_scores_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """`zeroshot_metrics` from a ready (N_images, C) score matrix (any similarity, e.g. FILIP's)."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1)
    found = (top.indices == labels[:, None]) & top.values.isfinite()  # a −inf score never counts (probes)
    hit1 = found[:, 0]
    hit5 = found.any(1)
    present = labels.unique()
    recalls = torch.stack([hit1[labels == c].double().mean() for c in present])
    return {
        "top1": hit1.double().mean().item(),
        "top5": hit5.double().mean().item(),
        "mean_recall": recalls.mean().item(),
    }


def zeroshot_chance(labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """Expected scores of a classifier that guesses uniformly at random among the classes."""
    return {"top1": 1 / n_classes, "top5": min(5, n_classes) / n_classes, "mean_recall": 1 / n_classes}
