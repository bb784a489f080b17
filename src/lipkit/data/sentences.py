"""Sub-captions by sentence (`data.split_sentences`), as DreamLIP (Zheng et al., 2024, "DreamLIP:
Language-Image Pre-training with Long Captions") samples the sentences of a long caption as positives.

A caption is cut after every sentence end — a run of ".", "!", "?" or ";" (with any closing quotes or
brackets) followed by white space, or a run of the full-width "。", "！", "？", "；" (with any closing
quotes or brackets) — each piece stripped, empty ones dropped; a piece without a letter joins the one
before it when it is only punctuation (". . .") and the next one when it holds a digit (a leading list
marker "1."; a marker after words — "a dog 2. a cat" — stays with the words before it). A sample's pool of captions
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
            if out and not any(c.isdigit() for c in piece):  # ". . ." ends the sentence before it
                out[-1] = f"{out[-1]} {piece}"
            else:  # a list marker ("2.") opens the next one
                pending = f"{pending} {piece}".strip()
            continue
        out.append(f"{pending} {piece}".strip() if pending else piece)
        pending = ""
    if pending and out:  # a trailing number-only piece ("A dog. 3.") stays with the sentence before it
        out[-1] = f"{out[-1]} {pending}"
        pending = ""
    return out or ([pending] if pending else [])


def sentence_pool(captions: Sequence[str]) -> list[str]:
    """Every distinct sentence of `captions`, in order of first appearance (the captions themselves when
    none has any text)."""
    pool = dict.fromkeys(s for c in captions for s in sentences(c))
    return list(pool) or list(captions)
