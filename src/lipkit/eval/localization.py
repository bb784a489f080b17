"""Where in the image, scored on a table whose rows have boxes with one caption each (`boxes`,
`object_captions`) and, for segmentation, a `mask` (data.regions). Each caption is embedded as written.

- Pointing game (Zhang et al., 2016): each box's caption gets a heat map per kind (eval.heatmaps:
  `similarity`, `gradcam`, and `filip` for a checkpoint evaluated token-wise); the map points at the centre
  of its highest token, a hit when that point lies inside the box (a flat map — every token equal — points
  nowhere: a miss): `localization/pointing/<kind>`. Chance: the mean share of the image a box covers (where
  a uniformly random point lands inside).
- Zero-shot segmentation (DenseCLIP's dense prediction, without DenseCLIP's training): in a row with a
  mask, each pixel goes to the caption — among that image's own — whose similarity map, upsampled
  bilinearly, is highest there, and is foreground when that map, min–max normalised over the image, is
  ≥ 0.5. IoU of each caption's predicted pixels with its objects' mask pixels (boxes of one image with the
  same caption, case folded, count as one class), intersections and unions summed over the split per
  caption, averaged over captions: `localization/segmentation/mIoU`
  (background is not a class). The baseline in the chance column is all foreground: every object predicted
  on every pixel (IoU = the share of the image its mask covers).
- Context-aware prompting (DenseCLIP's vision-to-language prompting, parameter-free here: eval.heatmaps.
  context_prompted with the model's own temperature and γ = 1 — DenseCLIP learns a transformer decoder for
  it and γ): the same segmentation from the prompted captions, `localization/segmentation/context_mIoU`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import Progress

from lipkit.data.image_store import ImageStore
from lipkit.data.regions import BOXES, CAPTIONS, MASK, mask_labels, row_regions
from lipkit.data.transforms import normalize
from lipkit.eval import heatmaps
from lipkit.eval.embedding import embed_texts
from lipkit.eval.regions import caption_name, region_rows
from lipkit.eval.token_similarity import text_tokens
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer

THRESHOLD, GAMMA = 0.5, 1.0
SHOWN = 4  # canvases whose maps the report draws


def segment(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(K, h, w) similarity maps of one image's K captions → (size, size) labels: 0 background, k + 1 the
    k-th caption (see the module doc)."""
    up = heatmaps.upsample(maps[None], size)[0]
    winner = up.argmax(0)
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    norm = (up - lo) / (hi - lo).clamp_min(1e-12)
    foreground = norm.gather(0, winner[None])[0] >= THRESHOLD
    return torch.where(foreground, winner + 1, torch.zeros_like(winner))


class _IoU:
    """Intersections and unions summed per caption."""

    def __init__(self) -> None:
        self.inter: dict[str, float] = defaultdict(float)
        self.union: dict[str, float] = defaultdict(float)

    def add(self, name: str, pred: torch.Tensor, truth: torch.Tensor) -> None:
        self.inter[name] += float((pred & truth).sum())
        self.union[name] += float((pred | truth).sum())

    def mean(self) -> float:
        return sum(self.inter[n] / max(self.union[n], 1.0) for n in self.union) / max(len(self.union), 1)


def _padded(per_image: list[list[int]], table: torch.Tensor) -> torch.Tensor:
    """Rows of `table` gathered per image, padded with zeros to the most texts of an image: (B, K, ...)."""
    k = max(len(ix) for ix in per_image)
    out = table.new_zeros((len(per_image), k, *table.shape[1:]))
    for b, ix in enumerate(per_image):
        out[b, : len(ix)] = table[ix]
    return out


class _Scores:
    """What the split accumulates: pointing hits per kind, box areas, IoUs, and the examples drawn."""

    def __init__(self) -> None:
        self.hits: dict[str, list[float]] = defaultdict(list)
        self.areas: list[float] = []
        self.iou = {"mIoU": _IoU(), "context_mIoU": _IoU(), "baseline": _IoU()}
        self.examples: list[dict[str, Any]] = []

    def point(self, kind: str, maps: torch.Tensor, boxes: list) -> None:
        """(K, h, w) maps of one image's K boxes."""
        peaks = heatmaps.peak_points(maps).tolist()
        flat = (maps.amax((1, 2)) == maps.amin((1, 2))).tolist()
        for (x, y), (x0, y0, x1, y1), nowhere in zip(peaks, boxes, flat, strict=True):
            self.hits[kind].append(float(not nowhere and x0 <= x <= x1 and y0 <= y <= y1))

    def segment(self, names: list[str], maps: dict[str, torch.Tensor], truth: torch.Tensor) -> None:
        size = truth.shape[-1]
        labels = {
            n: torch.tensor([k + 1 for k, m in enumerate(names) if m == n]) for n in dict.fromkeys(names)
        }
        for key, sim in (("mIoU", maps["similarity"]), ("context_mIoU", maps["context"])):
            pred = segment(sim, size)
            for name, ks in labels.items():
                self.iou[key].add(name, torch.isin(pred, ks), torch.isin(truth, ks))
        everywhere = torch.ones_like(truth, dtype=torch.bool)
        for name, ks in labels.items():
            self.iou["baseline"].add(name, everywhere, torch.isin(truth, ks))


def _texts(model, tokenizer, store: ImageStore, rows: Sequence[int], batch_size: int, filip: bool):
    """Each row's (boxes, captions), each distinct caption's index, embedding and (FILIP) token features."""
    regions = {i: row_regions(store.records[i], BOXES, CAPTIONS, "the evaluation table") for i in rows}
    distinct = sorted({c for _, caps in regions.values() for c in caps})
    at = {c: j for j, c in enumerate(distinct)}
    emb = embed_texts(model, tokenizer, distinct, batch_size)
    tokens = text_tokens(model, tokenizer, distinct, batch_size) if filip else None
    return regions, at, emb, tokens


def _maps(
    model: DualEncoder, x: torch.Tensor, per_image: list[list[int]], emb, tok
) -> dict[str, torch.Tensor]:
    """Every kind of heat map of a batch's captions, plus the context-prompted similarity ("context")."""
    text = _padded(per_image, emb).to(model.device)
    tokens = heatmaps.token_features(model, x)
    maps = {
        "similarity": heatmaps.similarity_maps(tokens, text),
        "gradcam": heatmaps.gradcam_maps(model, x, text),
    }
    if tok is not None:
        feats, mask = tok
        maps["filip"] = heatmaps.filip_maps(tokens, _padded(per_image, feats), _padded(per_image, mask))
    prompted = heatmaps.context_prompted(tokens, text, float(model.scale().detach()), GAMMA)
    maps["context"] = heatmaps.similarity_maps(tokens, prompted)
    return {k: m.float().cpu() for k, m in maps.items()}


def _score_batch(model, store: ImageStore, chunk: list[int], texts, scores: _Scores, shown: set[int]) -> None:
    regions, at, emb, tok = texts
    spec = model.spec
    x = normalize(store.get(chunk), spec.image_mean, spec.image_std).to(model.device)
    maps = _maps(model, x, [[at[c] for c in regions[i][1]] for i in chunk], emb, tok)
    kinds = [k for k in maps if k != "context"]
    for b, i in enumerate(chunk):
        boxes, caps = regions[i]
        n = len(caps)
        scores.areas += [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
        for kind in kinds:
            scores.point(kind, maps[kind][b, :n], boxes)
        record = store.records[i]
        if record.meta.get(MASK):
            truth = mask_labels(record, spec.image_size)
            scores.segment([caption_name(c) for c in caps], {k: m[b, :n] for k, m in maps.items()}, truth)
        if i in shown:
            drawn = {k: (torch.round(maps[k][b, :n] * 1e4) / 1e4).tolist() for k in kinds}
            scores.examples.append(
                {"image": str(record.image), "captions": caps, "boxes": boxes, "maps": drawn}
            )


def localization_metrics(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    store: ImageStore,
    batch_size: int,
    metrics: dict[str, float],
    chance: dict[str, float],
    filip: bool = False,
) -> list[dict[str, Any]]:
    """Pointing game and zero-shot segmentation of the store's rows with boxes (see the module doc) into
    `metrics` and `chance`; returns the heat maps of a few rows for the report."""
    rows = region_rows(store.records)
    texts = _texts(model, tokenizer, store, rows, batch_size, filip)
    rows = [i for i in rows if texts[0][i][0]]
    if not rows:
        return []
    scores = _Scores()
    shown = {rows[round(j * (len(rows) - 1) / max(1, SHOWN - 1))] for j in range(min(SHOWN, len(rows)))}
    with Progress(transient=True) as bar:
        task = bar.add_task("heat maps", total=len(rows))
        for s in range(0, len(rows), batch_size):
            _score_batch(model, store, rows[s : s + batch_size], texts, scores, shown)
            bar.advance(task, min(batch_size, len(rows) - s))
    area = sum(scores.areas) / len(scores.areas)
    for kind, hits in scores.hits.items():
        metrics[f"localization/pointing/{kind}"] = sum(hits) / len(hits)
        chance[f"localization/pointing/{kind}"] = area
    if scores.iou["baseline"].union:
        for key in ("mIoU", "context_mIoU"):
            metrics[f"localization/segmentation/{key}"] = scores.iou[key].mean()
            chance[f"localization/segmentation/{key}"] = scores.iou["baseline"].mean()
    return scores.examples
