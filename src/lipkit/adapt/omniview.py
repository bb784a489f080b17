"""`lipkit adapt --method omniview`: invariance tuning across the views of an object, after Omniview-Tuning
(Ruan et al., 2024, "Omniview-Tuning: Boosting Viewpoint Invariance of Vision-Language Pre-training
Models"), with CLIP-Adapter's residual MLP A (models.image_adapter) as the parameter-efficient module.

The table's rows are grouped into objects by `--column` (e.g. concept); each row is one view of its object
(e.g. one drawing style) and the object's text is the first caption of its first row. With f_i a view's
image feature (the frozen tower's, computed once), v_i = A(f_i)/‖A(f_i)‖, t_o the object's normalised text
embedding and s the checkpoint's logit scale, a step over B objects (with all their views) minimises

    L = CE(s·v tᵀ, object)  +  λ · 1/B Σ_o max_{i ∈ o} (1 − v_i · a_o)      a_o = Σ_{i∈o} v_i / ‖Σ_{i∈o} v_i‖

the first term keeps each view on its object's words (the paper keeps the image–text objective against
forgetting), the second pulls the *worst* view of each object to the object's anchor (the paper's
minimax cross-view alignment: the farthest view is the one optimised). λ = `view_weight`. The result is a
CLIP-Adapter checkpoint: every pooled image embedding (eval, embed, search, serve, ONNX) goes through A.

Not implemented: the paper's multi-view MVCap data (the table's groups are the views), its VIformer
module on the image tower (a feature-level adapter here), and its anchor choice; the anchor above is the
mean of the object's adapted views, lipkit's reading.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import track

from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.eval.embedding import embed_texts
from lipkit.models.image_adapter import ImageAdapter


@dataclass
class ViewSettings:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 256  # objects per step
    view_weight: float = 1.0  # λ
    reduction: int = 4
    ratio: float = 0.2
    seed: int = 0


@dataclass
class Views:
    raw: torch.Tensor  # (N, D) the frozen tower's image features, before normalisation
    owner: torch.Tensor  # (N,) each view's object
    text: torch.Tensor  # (O, D) each object's normalised text embedding
    names: list[str]  # (O,) the objects' values in the column


@torch.no_grad()
def views_of(model, tokenizer, records: list[Record], column: str) -> Views:
    """The objects of `records` with 2 or more views, their views' features computed once."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.meta.get(column) not in (None, "") and r.captions:
            groups.setdefault(str(r.meta[column]), []).append(r)
    names = sorted(k for k, v in groups.items() if len(v) >= 2)
    if len(names) < 2:
        raise UserError(
            f"Column '{column}' groups fewer than 2 objects with 2 or more rows (views); pass the column that "
            "names the object each row shows (e.g. concept)."
        )
    store = ImageStore([r for n in names for r in groups[n]], model.spec.image_size, cache=True, desc="views")
    seen = Counter(str(r.meta[column]) for r in store.records)  # the views whose image could be read
    names = [n for n in names if seen[n] >= 2]
    if len(names) < 2:
        raise UserError(
            f"Fewer than 2 objects of column '{column}' have 2 or more readable images; check the table's "
            "image paths."
        )
    mean, std = model.spec.image_mean, model.spec.image_std
    raw = []
    for s in range(0, len(store.records), 128):
        pixels = store.get(range(s, min(s + 128, len(store.records))))
        raw.append(model.visual(normalize(pixels, mean, std).to(model.device)).float())
    index = {n: i for i, n in enumerate(names)}  # an object left with one readable view is dropped
    kept = [i for i, r in enumerate(store.records) if str(r.meta[column]) in index]
    owner = torch.tensor([index[str(store.records[i].meta[column])] for i in kept], device=model.device)
    text = embed_texts(model, tokenizer, [groups[n][0].captions[0] for n in names], 256).to(model.device)
    return Views(torch.cat(raw)[kept], owner, text, names)


def view_losses(adapter, views: Views, objects: torch.Tensor, scale: torch.Tensor) -> tuple:
    """(caption term, worst-view term) of the module docstring over the given objects' views."""
    rows = torch.isin(views.owner, objects).nonzero().flatten()
    position = torch.full((len(views.text),), -1, dtype=torch.long, device=objects.device)
    position[objects] = torch.arange(len(objects), device=objects.device)
    owner = position[views.owner[rows]]
    v = F.normalize(adapter(views.raw[rows]), dim=-1)
    caption = F.cross_entropy(scale * v @ views.text[objects].t(), owner)
    anchors = F.normalize(
        torch.zeros(len(objects), v.shape[1], dtype=v.dtype, device=v.device).index_add(0, owner, v), dim=-1
    )
    distance = 1 - (v * anchors[owner]).sum(-1)
    worst = torch.full((len(objects),), -1.0, dtype=v.dtype, device=v.device).scatter_reduce(
        0, owner, distance, reduce="amax"
    )
    return caption, worst.mean()


def train_views(
    model, tokenizer, records, column: str, s: ViewSettings
) -> tuple[ImageAdapter, dict[str, Any]]:
    """The trained adapter and what `adapted` records of it."""
    views = views_of(model, tokenizer, records, column)
    torch.manual_seed(s.seed)
    adapter = ImageAdapter(model.spec.embed_dim, s.reduction, s.ratio).to(model.device)
    opt = torch.optim.AdamW(adapter.parameters(), lr=s.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed)
    scale, n = model.scale().detach(), len(views.names)

    def measure() -> list[float]:
        with torch.no_grad():
            terms = view_losses(adapter, views, torch.arange(n, device=model.device), scale)
        return [round(t.item(), 4) for t in terms]

    start = measure()
    for _ in track(range(s.steps), description="adapt (omniview)"):
        objects = torch.randperm(n, generator=g)[: s.batch_size].to(model.device)
        caption, worst = view_losses(adapter, views, objects, scale)
        opt.zero_grad(set_to_none=True)
        (caption + s.view_weight * worst).backward()
        opt.step()
    end = measure()
    info = {
        "column": column,
        "objects": n,
        "views": len(views.raw),
        "view_weight": s.view_weight,
        "reduction": s.reduction,
        "ratio": s.ratio,
        "steps": s.steps,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "trainable_parameters": sum(p.numel() for p in adapter.parameters()),
        "caption_loss": [start[0], end[0]],
        "worst_view_distance": [start[1], end[1]],
    }
    return adapter, info
