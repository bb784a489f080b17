"""Re-ranking a text query's hits with the checkpoint's image–text matching head (`lipkit search --rerank`,
`lipkit serve --rerank`): of the first `top` hits, those whose image this machine can read — its file, or
its bytes kept from a shard — are scored by the head (eval.rerank, the same scores as `lipkit eval`'s
retrieval/reranked) and re-ordered among the places they held, best first; a hit whose image cannot be read
keeps its place, and every hit after the first `top` keeps the index's order. Each re-ranked hit gets
`match`, the head's logit.

The head reads image token features, which no index keeps: the shortlist's images are decoded and run
through the image tower again (IMAGES_PER_CALL at a time), once per query (docs/reranking.md measures the
cost per query).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lipkit.data.image_policy import MAX_PIXELS
from lipkit.data.images import load_image
from lipkit.errors import UserError
from lipkit.eval.rerank import match_scores
from lipkit.eval.token_similarity import pooled_and_tokens
from lipkit.models.dual_encoder import DualEncoder
from lipkit.search.encode import encode_text_tokens
from lipkit.search.index_format import item_bytes
from lipkit.text.tokenizer import TextTokenizer

DEFAULT_TOP = 20  # a checkpoint trained with the itm objective re-ranks this many hits unless told otherwise
IMAGES_PER_CALL = 64  # shortlist images through the image tower per call


def resolve_rerank(
    requested: int | None, model: DualEncoder, checkpoint: str | Path, objective: str | None
) -> int:
    """--rerank: None → DEFAULT_TOP for a checkpoint trained with the itm objective (a head that a later run
    of another objective left untrained, or that `lipkit adapt --method ptunifier` added, is used only when
    asked: docs/adapt.md measures the latter re-ranking worse than the dense order), else 0; a number is
    checked."""
    has = getattr(model, "has_matcher", False)
    if requested is None:
        return DEFAULT_TOP if has and objective == "itm" else 0
    if not 0 <= requested <= 1000:
        raise UserError(f"--rerank must be from 0 (off) to 1000, got {requested}.")
    if requested and not has:
        raise UserError(
            f"Checkpoint '{checkpoint}' has no image–text matching head to re-rank with; train one with "
            "train.objective=itm (or add one with `lipkit adapt --method ptunifier`), or drop --rerank."
        )
    return requested


def _image(entry: dict[str, Any], size: int, max_pixels: int) -> torch.Tensor | None:
    """The item's image at `size`, or None when this machine cannot read it (missing, damaged, too large)."""
    try:
        data = item_bytes(entry)
        return None if data is None else load_image(data, size, max_pixels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


@torch.inference_mode()
def rerank_hits(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    items: list[dict[str, Any]],
    text: str,
    hits: list[dict[str, Any]],
    top: int,
    max_pixels: int = MAX_PIXELS,
) -> list[dict[str, Any]]:
    """`hits` (best first, each with the item `id`) with the readable ones of the first `top` re-ordered
    among their places by the matching head's score of (image, `text`), which each of them gets as `match`."""
    size = int(model.spec.image_size)
    places, pixels = [], []
    for n, h in enumerate(hits[:top]):
        u8 = _image(items[h["id"]], size, max_pixels)
        if u8 is not None:
            places.append(n)
            pixels.append(u8)
    if not places:
        return hits
    tokens = torch.cat(
        [
            pooled_and_tokens(model, torch.stack(pixels[s : s + IMAGES_PER_CALL]))[1]
            for s in range(0, len(pixels), IMAGES_PER_CALL)
        ]
    )
    query = torch.from_numpy(encode_text_tokens(model, tokenizer, [text]))
    mask = query.abs().sum(-1) > 0
    k = len(places)
    logits = match_scores(model, tokens, query.expand(k, -1, -1), mask.expand(k, -1)).tolist()
    ranked = sorted(range(k), key=lambda i: -logits[i])  # stable: equal scores keep the index's order
    out = list(hits)
    for place, i in zip(places, ranked, strict=True):
        out[place] = {**hits[places[i]], "match": round(logits[i], 6)}
    return out
