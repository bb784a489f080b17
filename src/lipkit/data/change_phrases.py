"""The phrase of a caption that says what changes — its verb and what goes with it ("moving left", "turning
into a cat", "growing") — found by rules over the words, since no parser model is reachable offline. VDI's
objective aligns it with the clip's visual dynamics (objectives/vdi.py).

Rules, first match wins (case-insensitive; a verb is a word ending in -ing that is not in `NOT_VERBS`; trailing
punctuation is dropped):
1. a verb followed by into / onto / to / toward(s) / from: the verb and the rest of the caption
   ("a cat turning into a dog" → "turning into a dog");
2. a verb that ends the caption ("pointing right hand growing" → "growing");
3. the last verb followed by a direction or particle word (`DIRECTIONS`): those two words
   ("grinning face moving left" → "moving left");
4. none: no phrase ("").
Not handled: other verb forms ("moves", "moved"), verbs the stop list misses, stative verbs before "to"
("belonging to"), negation, several changes in one caption.
"""

from __future__ import annotations

import re

import rich

NOT_VERBS = {
    "anything", "bling", "building", "ceiling", "clothing", "darling", "during", "evening", "everything", "king",
    "morning",
    "nothing", "pudding", "ring", "sibling", "something", "spring", "string", "thing", "viking", "wedding", "wing",
}  # fmt: skip
DIRECTIONS = (
    "left", "right", "up", "down", "clockwise", "counterclockwise", "anticlockwise", "away", "back", "forward",
    "forwards", "backward", "backwards", "around", "over", "out", "in", "off", "apart", "together",
)  # fmt: skip
_VERB = r"\b(?!(?:" + "|".join(sorted(NOT_VERBS)) + r")\b)([a-z]+ing)\b"
_INTO = re.compile(_VERB + r"\s+(?:into|to|towards|toward|onto|from)\s+\S.*$", re.I)
_DIRECTED = re.compile(_VERB + r"\s+(?:" + "|".join(DIRECTIONS) + r")\b", re.I)
_LAST = re.compile(_VERB + r"$", re.I)


def change_phrase(caption: str) -> str:
    """The caption's change phrase by the rules above, or "" when none applies."""
    text = " ".join(caption.split()).rstrip(".!?,;: ")
    found = _INTO.search(text)
    if found:
        return found.group(0).strip()
    last = _LAST.search(text)
    if last:
        return last.group(1)
    directed = list(_DIRECTED.finditer(text))
    return directed[-1].group(0).strip() if directed else ""


def add_change_phrases(records: list, source: str) -> None:
    """Each record's change phrase put second among its captions (`data.change_phrases`; its first caption
    when no rule applies, counted and reported); a `langs` list stays aligned with the captions."""
    missing = 0
    for r in (r for r in records if r.captions):
        phrase = change_phrase(r.captions[0])
        missing += not phrase
        r.captions = [r.captions[0], phrase or r.captions[0], *r.captions[1:]]
        langs = r.meta.get("langs")
        if isinstance(langs, list) and langs:
            r.meta["langs"] = [langs[0], langs[0], *langs[1:]]
    if missing:
        rich.get_console().print(
            f"[yellow]data.change_phrases:[/] no change phrase in the first caption of {missing} of {len(records)} "
            f"rows of {source} (their caption stands in for it)",
            highlight=False,
        )
