"""Sub-captions by sentence (`data.split_sentences`), as DreamLIP (Zheng et al., 2024, "DreamLIP:
Language-Image Pre-training with Long Captions") samples the sentences of a long caption as positives.

A caption is cut after every sentence end — a run of ".", "!", "?" or ";" (with any closing quotes or
brackets) followed by white space, or a run of the full-width "。", "！", "？", "；" (with any closing
quotes or brackets) — each piece stripped, empty ones dropped, and a piece without a letter ("1.", ". . .")
joined to the one before it (the next one when it comes first). A sample's pool of captions
becomes the sentences of all its captions, in order, each distinct sentence once; a caption without a
sentence end is one sentence. The captions each step trains on are then drawn from that pool
(`data.caption_policy`, `data.captions_per_image`), so with the multi-positive objective the image's
sampled sub-captions are its positives. Not implemented: splitting by a language model or a parser
(abbreviations such as "e.g. " end a sentence here).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SENTENCE_END = re.compile(r"[.!?;]+[\"'”’)\]]*(?=\s)|[。！？；]+[」』）”’)\]]*")


def sentences(caption: str) -> list[str]:
    """The caption's sentences, stripped, without empty ones (the whole caption when it has no end)."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(caption):
        pieces.append(caption[start : m.end()].strip())
        start = m.end()
    pieces.append(caption[start:].strip())
    out: list[str] = []
    pending = ""  # letterless pieces before the first sentence
    for piece in filter(None, pieces):
        if not any(c.isalpha() for c in piece):
            if out:
                out[-1] = f"{out[-1]} {piece}"
            else:
                pending = f"{pending} {piece}".strip()
            continue
        out.append(f"{pending} {piece}".strip() if pending else piece)
        pending = ""
    return out or ([pending] if pending else [])


def sentence_pool(captions: Sequence[str]) -> list[str]:
    """Every distinct sentence of `captions`, in order of first appearance (the captions themselves when
    none has any text)."""
    pool = dict.fromkeys(s for c in captions for s in sentences(c))
    return list(pool) or list(captions)
