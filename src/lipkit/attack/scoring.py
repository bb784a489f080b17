"""What `lipkit attack` scores images against and how: the task's targets (a column's zero-shot classes or
the split's captions, built as `lipkit eval` builds them), SGA's guidance sets, each image's answer, and the
metrics of a set of image stores (clean, attacked, random) by eval's own function — for the checkpoint
attacked and for each checkpoint the attack is transferred to."""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from lipkit.attack.sga import padded
from lipkit.config_eval import EvalConfig
from lipkit.data.image_store import ImageStore
from lipkit.data.label_sets import INDEX_SUFFIX, fill_template
from lipkit.errors import UserError
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.evaluate import RetrievalTexts, evaluate_records
from lipkit.eval.similarity_choice import resolve_similarity
from lipkit.eval.zeroshot import class_embeddings
from lipkit.models.adapters import applies_to


class Targets(NamedTuple):
    """What the task scores an image against: embeddings (K, D), the truth — (N,) labels or the (N, K)
    own-caption mask — the K names (classes or captions) for the report, and for zero-shot each class's
    normalised prompt embeddings (K, templates, D)."""

    emb: torch.Tensor
    truth: torch.Tensor
    names: list[str]
    prompts: torch.Tensor | None = None


def check_model(model, info: dict, task: str, column: str) -> None:
    """Refuse checkpoints whose reported score is not the pooled cosine the attack ascends."""
    objective = (info.get("train") or {}).get("objective")
    scored = resolve_similarity("auto", objective)
    if scored != "dense":
        how = {"filip": "token-wise", "lexical": "lexically"}.get(scored, "by text-conditioned frame pooling")
        raise UserError(
            f"This checkpoint is scored {how} (train.objective {objective}) and the attack ascends the pooled "
            "similarity; attack a checkpoint scored by pooled embeddings."
        )
    if task == "zeroshot" and applies_to(model.spec.adapter, column):
        raise UserError(
            f"This checkpoint classifies '{column}' with a class head from `lipkit adapt`, which the attack "
            "does not ascend; attack the checkpoint it was adapted from, or another --column."
        )


def task_targets(model, tokenizer, records, task: str, column: str, cfg: EvalConfig, sets: dict) -> Targets:
    """What the task scores each image against (Targets): the classes, templates and labels as eval's
    zero-shot takes them (a source's own label set when it names one), or the split's retrieval captions."""
    if task == "zeroshot":
        values = [r.meta.get(column) for r in records]
        if any(v in (None, "") or isinstance(v, list) for v in values):
            raise UserError(
                f"Column '{column}' does not give every image one label; pass a single-label --column "
                "(e.g. subcategory) or --task retrieval."
            )
        label_set = sets.get(column)
        classes = label_set.classes if label_set else sorted(set(values))
        templates = (label_set.templates if label_set else None) or cfg.templates
        indices = [r.meta.get(column + INDEX_SUFFIX) for r in records] if label_set else [None]
        if any(i is None for i in indices):
            index = {c: i for i, c in enumerate(classes)}
            indices = [index[v] for v in values]
        prompts = [fill_template(t, str(c)) for c in classes for t in templates]
        texts = embed_texts(model, tokenizer, prompts, cfg.batch_size)
        emb = class_embeddings(texts, len(classes), len(templates))
        per_template = F.normalize(texts.float(), dim=-1).view(len(classes), len(templates), -1)
        return Targets(emb, torch.tensor(indices), [str(c) for c in classes], per_template)
    if not all(r.captions for r in records):
        raise UserError("--task retrieval needs a caption for every image of SOURCE; give each row one.")
    texts = RetrievalTexts.of(records, cfg.retrieval_caption)
    emb = embed_texts(model, tokenizer, texts.texts, cfg.batch_size)
    return Targets(emb, texts.relevant.t(), texts.texts)  # truth (N, T): image i's own captions


def guidance_sets(
    model, tokenizer, records, targets: Targets, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGA's text set of each image (attack.sga): its class's prompts (zero-shot) or every caption of its row
    (retrieval), normalised, as (N, K, D) and the (N, K) mask."""
    if targets.prompts is not None:
        chosen = targets.prompts[targets.truth]
        return chosen, torch.ones(chosen.shape[:2], dtype=torch.bool)
    flat = [c for r in records for c in r.captions]
    emb = F.normalize(embed_texts(model, tokenizer, flat, batch).float(), dim=-1)
    return padded(list(emb.split([len(r.captions) for r in records])))


def predict(model, store: ImageStore, targets: Targets, batch: int) -> torch.Tensor:
    """(N,) each image's best class / caption (its row of targets.emb)."""
    return (embed_images(model, store, batch) @ targets.emb.t()).argmax(1)


def is_right(targets: Targets, best: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the zero-shot top-1 is the label / the nearest caption is one of the image's own."""
    if targets.truth.dim() == 2:
        return targets.truth[torch.arange(len(best)), best]
    return best == targets.truth


def score_stores(
    model, tokenizer, records, cfg: EvalConfig, sets: dict, stores: dict[str, ImageStore], targets: Targets
) -> dict[str, Any]:
    """Each store's metrics (eval.evaluate.evaluate_records), answers and correctness, and each attacked
    store's success rate: the share of the images right on the clean store that it gets wrong (None if
    none is right)."""
    best = {name: predict(model, st, targets, cfg.batch_size) for name, st in stores.items()}
    right = {name: is_right(targets, b) for name, b in best.items()}
    clean = right["clean"]
    success = {
        name: float((clean & ~right[name]).sum()) / int(clean.sum()) if clean.any() else None
        for name in stores
        if name != "clean"
    }
    metrics = {
        name: evaluate_records(model, tokenizer, records, cfg, store=st, details=False, labels=sets)[
            "metrics"
        ]
        for name, st in stores.items()
    }
    return {"metrics": metrics, "best": best, "right": right, "success": success}


def resized(store: ImageStore, size: int) -> ImageStore:
    """The store's 8-bit images at `size` (bilinear, antialiased; the store itself when it is that size)."""
    if store.cache.shape[-1] == size:
        return store
    out = copy.copy(store)
    out.cache, out.size = torch.empty(len(store.cache), 3, size, size, dtype=torch.uint8), size
    for i in range(0, len(store.cache), 256):  # in chunks: the float copy of a whole split is large
        x = F.interpolate(
            store.cache[i : i + 256].float(), size=(size, size), mode="bilinear", antialias=True
        )
        out.cache[i : i + 256] = x.round().clamp(0, 255).to(torch.uint8)
    return out
