"""A split's images captioned by the checkpoint's caption decoder and scored against their own captions:
BLEU-4 (add-one smoothed: emoji labels are short), CIDEr-D (eval.caption_metrics) and, with
`eval.caption_scorer`, CLIP-score by that checkpoint — choose another than the captioner (or than the one a
frozen decoder was trained on): a model judging captions shaped by its own embedding favours them.

CLIP-score (Hessel et al., 2021, "CLIPScore"): w · max(cos(image, caption), 0) with w = 2.5, averaged over
the images. The metrics hold all three × 100, as papers print them (BLEU-4 30.5, CIDEr-D 85.0, CLIP-score
76.1), not as fractions: they are scores, not rates, so they carry no chance level. The references are
each image's captions in `eval.caption_langs` (a `langs` list column parallel to the captions names them; [] or no such column:
every caption). `eval.caption_max_images` images spread over the split are captioned (beam search is
sequential per image), by beam search of width `eval.caption_beam`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import rich
import torch
from rich.progress import Progress

from lipkit.config import EvalConfig
from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record, spread_subset
from lipkit.eval.caption_metrics import bleu, cider_d
from lipkit.eval.captioning import caption_images
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer

CLIP_SCORE_W = 2.5
EXAMPLES = 8  # captioned images shown in the report, spread over the captioned ones


def references(record: Record, langs: Sequence[str]) -> list[str]:
    """The record's captions in `langs` (all of them when `langs` is empty or it has no langs column)."""
    tags = record.meta.get("langs")
    if not langs or not isinstance(tags, list) or len(tags) != len(record.captions):
        return list(record.captions)
    return [c for c, lang in zip(record.captions, tags, strict=True) if lang in langs]


def generate(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    store: ImageStore,
    rows: Sequence[int],
    beam: int,
    samples: int = 0,
) -> list[str]:
    """Captions of the store's images `rows`, with a progress bar (`samples`: eval.captioning's MacCap
    candidates, for a text-only decoder trained with noise; ignored for any other)."""
    text_only = (
        model.spec.caption_input == "embedding" and float(getattr(model.captioner, "noise_std", 0)) > 0
    )
    samples = samples if text_only else 0
    out: list[str] = []
    with Progress(transient=True) as bar:
        task = bar.add_task("captioning images", total=len(rows))
        for s in range(0, len(rows), 16):
            chunk = list(rows[s : s + 16])
            out += [
                c["caption"] for c in caption_images(model, tokenizer, store.get(chunk), beam, 0, samples)
            ]
            bar.advance(task, len(chunk))
    return out


@torch.no_grad()
def clip_score(
    scorer: DualEncoder,
    scorer_tokenizer: TextTokenizer,
    records: Sequence[Record],
    captions: Sequence[str],
    style: str = "lipkit",
) -> float:
    """Mean of 2.5 · max(cos(image, caption), 0) under `scorer`, each record's image decoded at the
    scorer's own input size (not resized from another model's), 64 at a time."""
    img = embed_images(scorer, ImageStore(records, scorer.spec.image_size, cache=False, style=style), 64)
    txt = embed_texts(scorer, scorer_tokenizer, list(captions), 256)
    cos = (img * txt).sum(1)
    return CLIP_SCORE_W * cos.clamp(min=0).mean().item()


def caption_split(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    store: ImageStore,
    cfg: EvalConfig,
    metrics: dict[str, float],
    scorer: tuple[DualEncoder, TextTokenizer] | None = None,
) -> list[dict[str, Any]]:
    """Caption metrics of the store's images that have references, into `metrics` under captions/...;
    returns examples for the report (image, caption, references)."""
    have = [i for i, r in enumerate(store.records) if references(r, cfg.caption_langs)]
    rows = spread_subset(have, cfg.caption_max_images)
    if not rows:
        rich.get_console().print(
            f"[yellow]eval:[/] no image has a caption in eval.caption_langs {cfg.caption_langs}: "
            "captions not scored (set eval.caption_langs=[] for every caption)",
            highlight=False,
        )
        return []
    refs = [references(store.records[i], cfg.caption_langs) for i in rows]
    captions = generate(model, tokenizer, store, rows, cfg.caption_beam, cfg.caption_samples)
    corpus, each = cider_d(captions, refs)
    metrics["captions/BLEU-4"] = 100 * bleu(captions, refs, smooth=True)
    metrics["captions/CIDEr-D"] = 100 * corpus
    if scorer is not None:
        chosen = [store.records[i] for i in rows]
        metrics["captions/CLIP-score"] = 100 * clip_score(*scorer, chosen, captions, store.style)
    return [
        {"image": str(store.records[row].image), "caption": c, "references": r, "cider_d": round(s, 4)}
        for row, c, r, s in spread_subset(list(zip(rows, captions, refs, each, strict=True)), EXAMPLES)
    ]
