"""Region → caption retrieval on a table with boxes (`boxes` and `object_captions` columns, as `lipkit data
build canvases` writes them): each box's region embedding (DualEncoder.encode_region: pooled from the
token grid) ranks the table's distinct region captions; R@1 / R@5 count a region whose own caption (case
folded, whitespace collapsed) is among the top 1 / 5. The baseline ranks the same captions with the image
embedding of the box's crop: the box cut out of the image as the model sees it and resized (stretched) to
the model's side — what a whole-image model can do for a region. Chance: k / (number of distinct captions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rich.progress import Progress

from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.data.regions import BOXES, CAPTIONS, row_regions
from lipkit.data.transforms import normalize
from lipkit.eval.embedding import embed_texts
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer

KS = (1, 5)


def has_regions(records: Sequence[Record]) -> bool:
    """Whether any row has boxes (data.regions); a malformed row is refused when scored."""
    return any(r.meta.get(BOXES) or r.meta.get(CAPTIONS) for r in records)


def region_rows(records: Sequence[Record]) -> list[int]:
    """The indices of the rows with boxes or region captions (what has_regions looks for)."""
    return [i for i, r in enumerate(records) if r.meta.get(BOXES) or r.meta.get(CAPTIONS)]


def caption_name(text: str) -> str:
    """A region caption as compared: whitespace collapsed, case folded."""
    return " ".join(str(text).split()).casefold()


def crops(images_u8: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 and (R, 5) rois (image index, x0, y0, x1, y1 fractions) → (R, 3, S, S) uint8:
    each box's pixels resized to the full side (bilinear, antialiased)."""
    side = images_u8.shape[-1]
    out = []
    for i, *box in rois.tolist():
        x0, y0 = min(side - 1, round(box[0] * side)), min(side - 1, round(box[1] * side))
        x1, y1 = max(x0 + 1, round(box[2] * side)), max(y0 + 1, round(box[3] * side))
        crop = images_u8[int(i), :, y0:y1, x0:x1].float()[None]
        out.append(
            F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        )
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def _embed_regions(model: DualEncoder, store: ImageStore, rows: list[int], batch_size: int):
    """(R, D) region embeddings and (R, D) crop embeddings of every box of `rows`, and each box's caption."""
    spec, regions, cropped, names = model.spec, [], [], []
    with Progress(transient=True) as bar:
        task = bar.add_task("embedding regions", total=len(rows))
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            images = store.get(chunk)
            recs = [store.records[i] for i in chunk]
            regions_of = [row_regions(r, BOXES, CAPTIONS, "the evaluation table") for r in recs]
            boxes = [b for b, _ in regions_of]
            names += [c for _, caps in regions_of for c in caps]
            x = normalize(images, spec.image_mean, spec.image_std).to(model.device)
            regions.append(model.encode_region(x, boxes).float().cpu())
            rois = torch.tensor([[i, *b] for i, per in enumerate(boxes) for b in per], dtype=torch.float32)
            for c in range(0, len(rois), batch_size):
                cropped.append(model.embed_images_u8(crops(images, rois[c : c + batch_size])))
            bar.advance(task, len(chunk))
    return torch.cat(regions), torch.cat(cropped), names


def region_metrics(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    store: ImageStore,
    batch_size: int,
    metrics: dict[str, float],
    chance: dict[str, float],
) -> None:
    """Region→caption and crop→caption R@k of the store's rows with boxes, into `metrics` and `chance`."""
    rows = region_rows(store.records)
    regions, cropped, captions = _embed_regions(model, store, rows, batch_size)
    if not captions:
        return
    spelling: dict[str, str] = {}  # folded name → its first spelling (what the text tower reads)
    for c in captions:
        spelling.setdefault(caption_name(c), c)
    names = [caption_name(c) for c in captions]
    folded = sorted(spelling)
    texts = [spelling[n] for n in folded]
    text_emb = embed_texts(model, tokenizer, texts, batch_size)
    at = {n: i for i, n in enumerate(folded)}
    own = torch.tensor([at[n] for n in names])
    for kind, emb in (("region_to_text", regions), ("crop_to_text", cropped)):
        ranked = (emb @ text_emb.t()).argsort(dim=1, descending=True, stable=True)
        for k in KS:
            hit = (ranked[:, :k] == own[:, None]).any(1).float().mean().item()
            metrics[f"regions/{kind}/R@{k}"] = hit
            chance[f"regions/{kind}/R@{k}"] = min(1.0, k / len(texts))
