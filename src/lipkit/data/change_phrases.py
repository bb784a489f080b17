"""The phrase of a caption that says what changes — its verb and what goes with it ("moving left", "turning
into a cat", "growing") — found by rules over the words, since no parser model is reachable offline. VDI's
objective aligns it with the clip's visual dynamics (objectives/vdi.py).

Rules, first match wins (case-insensitive; a verb is a word ending in -ing that is not in `NOT_VERBS`):
1. a verb followed by into / to / toward(s) / onto / from: the verb and the rest of the caption
   ("a cat turning into a dog" → "turning into a dog");
2. the last verb followed by a direction or particle word (`DIRECTIONS`): those two words
   ("grinning face moving left" → "moving left");
3. a verb that ends the caption ("raising hands growing" → "growing");
4. none: no phrase ("").
Not handled: other verb forms ("moves", "moved"), verbs the stop list misses, negation, several changes.
"""

from __future__ import annotations

import re

NOT_VERBS = {
    "anything", "bling", "building", "ceiling", "clothing", "darling", "evening", "everything", "king", "morning",
    "nothing", "pudding", "ring", "sibling", "something", "spring", "string", "thing", "viking", "wedding", "wing",
}  # fmt: skip
DIRECTIONS = (
    "left", "right", "up", "down", "clockwise", "counterclockwise", "anticlockwise", "away", "back", "forward",
    "forwards", "backward", "backwards", "around", "over", "out", "in", "off", "apart", "together",
)  # fmt: skip
_VERB = r"\b(?!(?:" + "|".join(sorted(NOT_VERBS)) + r")\b)([a-z]+ing)\b"
_INTO = re.compile(_VERB + r"\s+(?:into|to|towards|toward|onto|from)\s+\S.*$", re.I)
_DIRECTED = re.compile(_VERB + r"\s+(?:" + "|".join(DIRECTIONS) + r")\b", re.I)
_LAST = re.compile(_VERB + r"[\s.!]*$", re.I)


def change_phrase(caption: str) -> str:
    """The caption's change phrase by the rules above, or "" when none applies."""
    text = " ".join(caption.split())
    found = _INTO.search(text)
    if found:
        return found.group(0).strip()
    directed = list(_DIRECTED.finditer(text))
    if directed:
        return directed[-1].group(0).strip()
    last = _LAST.search(text)
    return last.group(1) if last else ""
