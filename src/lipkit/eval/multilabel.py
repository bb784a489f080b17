"""Multi-label zero-shot classification over a list-valued column (an image with several objects has
several labels: the canvases' per-object `subcategory`, ...): every image is scored against every class's
prompts as in single-label zero-shot, and each class ranks the images.

- `zeroshot/<column>/mAP`: the mean over classes (those with at least one positive image) of the average
  precision — the mean, over the class's positive images, of the precision at each one's rank (ties broken
  by image order);
- chance: the expected mAP of a random ranking, approximated by the mean over those classes of their share
  of positive images (exact as the number of images grows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """(N,) scores and (N,) bool → AP of ranking the N items by score (descending, stable)."""
    order = scores.argsort(descending=True, stable=True)
    hits = positive[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())


def multilabel_zeroshot(
    class_scores: Callable[[list[str]], torch.Tensor],
    values: Sequence[list],
    column: str,
    metrics: dict[str, float],
    chance: dict[str, float],
) -> None:
    """`values`: each image's labels in `column`; `class_scores(classes)` → (N, C) zero-shot scores."""
    labels = [{str(v) for v in vs if v not in (None, "")} for vs in values]
    classes = sorted(set().union(*labels))
    if not classes:
        return
    index = {c: i for i, c in enumerate(classes)}
    target = torch.zeros(len(values), len(classes), dtype=torch.bool)
    for n, ls in enumerate(labels):
        target[n, [index[c] for c in ls]] = True
    scores = class_scores(classes).float()
    aps = [average_precision(scores[:, c], target[:, c]) for c in range(len(classes))]
    metrics[f"zeroshot/{column}/mAP"] = sum(aps) / len(aps)
    chance[f"zeroshot/{column}/mAP"] = float(target.float().mean(0).mean())
