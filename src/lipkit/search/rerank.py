"""Re-ranking a text query's hits with the checkpoint's image–text matching head (`lipkit search --rerank`,
`lipkit serve --rerank`): the first `top` hits whose image this machine can read — its file, or its bytes
kept from a shard — are scored by the head (eval.rerank, the same scores as `lipkit eval`'s
retrieval/reranked) and come first, best first; every other hit follows in the index's order. Each
re-ranked hit gets `match`, the head's logit.

The head reads image token features, which no index keeps: the shortlist's images are decoded and run
through the image tower again, one batch per query (docs/search.md measures the cost per query).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lipkit.data.images import load_image
from lipkit.errors import UserError
from lipkit.eval.rerank import match_scores
from lipkit.eval.token_similarity import pooled_and_tokens
from lipkit.models.dual_encoder import DualEncoder
from lipkit.search.encode import encode_text_tokens
from lipkit.search.index_format import item_bytes
from lipkit.text.tokenizer import TextTokenizer

DEFAULT_TOP = 20  # a checkpoint with a matching head re-ranks this many hits unless told otherwise


def resolve_rerank(requested: int | None, model: DualEncoder, checkpoint: str | Path) -> int:
    """--rerank: None → DEFAULT_TOP for a checkpoint with a matching head, else 0; a number is checked."""
    has = getattr(model, "has_matcher", False)
    if requested is None:
        return DEFAULT_TOP if has else 0
    if not 0 <= requested <= 1000:
        raise UserError(f"--rerank must be from 0 (off) to 1000, got {requested}.")
    if requested and not has:
        raise UserError(
            f"Checkpoint '{checkpoint}' has no image–text matching head to re-rank with; train one with "
            "train.objective=itm, or drop --rerank."
        )
    return requested


def _image(entry: dict[str, Any], size: int) -> torch.Tensor | None:
    data = item_bytes(entry)
    if data is None:
        return None
    try:
        return load_image(data, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # unreadable here: the hit keeps its place below the re-ranked ones


@torch.inference_mode()
def rerank_hits(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    items: list[dict[str, Any]],
    text: str,
    hits: list[dict[str, Any]],
    top: int,
) -> list[dict[str, Any]]:
    """`hits` (best first, each with the item `id`) with the first `top` readable ones re-ordered by the
    matching head's score of (image, `text`), which each of them gets as `match`."""
    size = int(model.spec.image_size)
    chosen, pixels = [], []
    for n, h in enumerate(hits[:top]):
        u8 = _image(items[h["id"]], size)
        if u8 is not None:
            chosen.append(n)
            pixels.append(u8)
    if not chosen:
        return hits
    tokens = pooled_and_tokens(model, torch.stack(pixels))[1]
    query = torch.from_numpy(encode_text_tokens(model, tokenizer, [text]))
    mask = query.abs().sum(-1) > 0
    k = len(chosen)
    logits = match_scores(model, tokens, query.expand(k, -1, -1), mask.expand(k, -1)).tolist()
    ranked = sorted(range(k), key=lambda i: -logits[i])  # stable: equal scores keep the index's order
    first = [{**hits[chosen[i]], "match": round(logits[i], 6)} for i in ranked]
    rest = [h for n, h in enumerate(hits) if n not in set(chosen)]
    return first + rest
