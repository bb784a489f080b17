"""The few-shot protocol of `lipkit eval` (`eval.few_shot`: the K values, e.g. [1, 2, 4, 8, 16]), as the
prompt-learning papers report it (CoOp, Zhou et al., 2022; CoCoOp; GRAM): for each class column, seed and
K, K images per class are drawn from a training table (lipkit.data.few_shot, `eval.few_shot_table`) and two
few-shot classifiers that need no gradient step through the model are scored on the split:

- "probe": a linear probe (eval.linear_probe: logistic regression, λ picked on held-out shots when there
  are enough) on the shots' normalised image embeddings;
- "tip": Tip-Adapter (models.tip_cache), logits = t·x·Wᵀ + α·exp(−β(1 − x·Fᵀ))·L with the shots as the
  cache, W the zero-shot classifier of `eval.templates`, α = β = 1.

`eval.few_shot_classes: base` is CoOp's base-to-novel protocol: shots of the first half of the sorted
classes only; the split's base-class images are scored among the base classes, its novel-class images
among the novel classes. Neither classifier has anything for a novel class (a probe cannot name a class it
never saw, the cache adds nothing to it), so novel is the zero-shot score, reported once as
`fewshot/<column>/zeroshot/novel`; the methods that carry something to novel classes train (CoOp's
context: `lipkit adapt`, measured under this protocol by bench/few_shot.py). `all`: every class has shots.

Metrics: `fewshot/<column>/zeroshot/<base|novel|all>` and `fewshot/<column>/<K>shot/<probe|tip>/<base|all>`,
the mean top-1 over `eval.few_shot_seeds` seeds, with chance levels; the split's `few_shot` entry holds
each seed's value and the standard deviation.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from lipkit.config_eval import EvalConfig
from lipkit.data.few_shot import class_split, few_shot
from lipkit.data.image_store import ImageStore
from lipkit.data.label_sets import fill_template
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.evaluate import image_style
from lipkit.eval.linear_probe import fit_linear_probe
from lipkit.eval.zeroshot import class_embeddings
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.tip_cache import TipCache
from lipkit.text.tokenizer import TextTokenizer


def _top1(scores: torch.Tensor, target: torch.Tensor) -> float:
    return (scores.argmax(1) == target).double().mean().item()


def _first_k(labels: Sequence[str], k: int) -> list[int]:
    """Indices of each class's first k shots (the shots of K ≤ K_max: a prefix per class)."""
    seen: Counter = Counter()
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < k:
            keep.append(i)
        seen[y] += 1
    return keep


class _Column:
    """One class column: the split's images by part (base/novel or all), the zero-shot classifier."""

    def __init__(self, model, tokenizer, cfg: EvalConfig, images, labels: list[str], names: list[str]):
        self.trained = class_split(names, cfg.few_shot_classes)
        parts = {"all": names} if cfg.few_shot_classes == "all" else {"base": self.trained}
        if cfg.few_shot_classes == "base":
            parts["novel"] = class_split(names, "novel")
        prompts = [fill_template(t, c) for c in names for t in cfg.templates]
        texts = embed_texts(model, tokenizer, prompts, cfg.batch_size)
        weights = class_embeddings(texts, len(names), len(cfg.templates))
        self.parts: dict[str, tuple] = {}
        for part, classes in parts.items():
            index = {c: i for i, c in enumerate(classes)}
            rows = [i for i, y in enumerate(labels) if y in index]
            if rows and len(classes) > 1:
                target = torch.tensor([index[labels[i]] for i in rows])
                w = weights[[names.index(c) for c in classes]]
                self.parts[part] = (classes, images[rows], [labels[i] for i in rows], target, w)


def _score_shots(model, column: _Column, feats: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Top-1 of the probe and Tip-Adapter fitted on these shots, on the trained part of the split."""
    part = "all" if "all" in column.parts else "base"
    if part not in column.parts:
        return {}
    classes, images, names, target, w = column.parts[part]
    out = {}
    if len(set(labels)) > 1:
        probe = fit_linear_probe(feats, labels)
        scores, probe_target, _ = probe.classify(images, names)
        out[f"probe/{part}"] = _top1(scores, probe_target)
    index = {c: i for i, c in enumerate(classes)}
    cache = TipCache(feats.shape[1], [index[y] for y in labels], classes)
    cache.keys.data.copy_(feats)
    with torch.no_grad():
        out[f"tip/{part}"] = _top1(
            cache.logits(images, w, model.scale().detach().float().cpu(), classes), target
        )
    return out


def few_shot_metrics(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    store: ImageStore,
    shot_records: Sequence[Record],
    cfg: EvalConfig,
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """(metrics, chance, per-seed details) of the protocol above for the split whose images `store` holds
    (the store `evaluate_records` scored: decoded once, in eval's image style)."""
    if any(k < 1 for k in cfg.few_shot) or cfg.few_shot_seeds < 1:
        raise UserError(
            f"eval.few_shot needs K values of 1 or more and eval.few_shot_seeds 1 or more, not "
            f"{cfg.few_shot} and {cfg.few_shot_seeds}."
        )
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    details: dict[str, Any] = {}
    images = embed_images(model, store, cfg.batch_size)
    for col in cfg.class_columns:
        labels = [r.meta.get(col) for r in store.records]
        names = sorted({str(r.meta[col]) for r in shot_records if isinstance(r.meta.get(col), str | int)})
        if len(names) < 2 or any(not isinstance(y, str | int) for y in labels):
            continue  # not a single-label column of both tables
        column = _Column(model, tokenizer, cfg, images, [str(y) for y in labels], names)
        for part, (classes, imgs, _, target, w) in column.parts.items():
            metrics[f"fewshot/{col}/zeroshot/{part}"] = _top1(imgs @ w.t(), target)
            chance[f"fewshot/{col}/zeroshot/{part}"] = 1 / len(classes)
        runs: dict[str, list[float]] = {}
        for seed in range(cfg.few_shot_seeds):
            drawn, _ = few_shot(shot_records, col, max(cfg.few_shot), seed, column.trained)
            shot_store = ImageStore(
                drawn, model.spec.image_size, cache=False, desc=f"shots (seed {seed})", style=image_style(cfg)
            )
            feats = embed_images(model, shot_store, cfg.batch_size)
            shot_labels = [str(r.meta[col]) for r in shot_store.records]
            for k in cfg.few_shot:
                keep = _first_k(shot_labels, k)
                scored = _score_shots(model, column, feats[keep], [shot_labels[i] for i in keep])
                for name, value in scored.items():
                    runs.setdefault(f"fewshot/{col}/{k}shot/{name}", []).append(value)
        for key, values in runs.items():
            metrics[key] = statistics.mean(values)
            chance[key] = 1 / len(column.parts["all" if "all" in column.parts else "base"][0])
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            details[key] = {"seeds": values, "std": std}
    return metrics, chance, details
