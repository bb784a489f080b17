"""Sub-captions by sentence (`data.split_sentences`), as DreamLIP (Zheng et al., 2024, "DreamLIP:
Language-Image Pre-training with Long Captions") samples the sentences of a long caption as positives.

A caption is cut after every sentence end — ".", "!", "?" or ";" followed by white space, or the
full-width "。", "！", "？", "；" — each piece stripped, empty ones dropped. A sample's pool of captions
becomes the sentences of all its captions, in order, each distinct sentence once; a caption without a
sentence end is one sentence. The captions each step trains on are then drawn from that pool
(`data.caption_policy`, `data.captions_per_image`), so with the multi-positive objective the image's
sampled sub-captions are its positives. Not implemented: splitting by a language model or a parser
(abbreviations such as "e.g. " end a sentence here).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])")


def sentences(caption: str) -> list[str]:
    """The caption's sentences, stripped, without empty ones (the whole caption when it has no end)."""
    parts = [p.strip() for p in _SENTENCE_END.split(caption)]
    return [p for p in parts if p] or ([caption.strip()] if caption.strip() else [])


def sentence_pool(captions: Sequence[str]) -> list[str]:
    """Every distinct sentence of `captions`, in order of first appearance (the captions themselves when
    none has any text)."""
    pool = dict.fromkeys(s for c in captions for s in sentences(c))
    return list(pool) or list(captions)
