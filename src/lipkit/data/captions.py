"""Caption selection that depends only on a record's own columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lipkit.data.sources import Record
from lipkit.errors import UserError


def keep_languages(
    records: Sequence[Record], languages: Sequence[str], column: str = "langs"
) -> list[Record]:
    """Keep the captions whose language (the parallel list in `column`) is in `languages`; rows left with
    no caption are dropped. An empty `languages` keeps everything."""
    if not languages:
        return list(records)
    wanted, out = set(languages), []
    for r in records:
        langs = r.meta.get(column)
        if not isinstance(langs, list) or len(langs) != len(r.captions):
            raise UserError(
                f"data.caption_langs needs a '{column}' list parallel to the captions in every row "
                f"(row for {r.image} has none); remove data.caption_langs or add the column."
            )
        caps = [c for c, lang in zip(r.captions, langs, strict=True) if lang in wanted]
        if caps:
            out.append(
                replace(r, captions=caps, meta={**r.meta, column: [lang for lang in langs if lang in wanted]})
            )
    return out
