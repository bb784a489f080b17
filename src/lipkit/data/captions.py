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


def select_captions(
    records: Sequence[Record], positions: Sequence[int], column: str = "langs"
) -> list[Record]:
    """Keep the captions at these positions of each row, in this order (e.g. [2, 0]: the third caption,
    then the first); positions a row does not have are skipped, rows left with none are dropped. A
    parallel `column` list (languages) is reordered alike. An empty `positions` keeps everything."""
    if not positions:
        return list(records)
    out = []
    for r in records:
        keep = [i for i in positions if -len(r.captions) <= i < len(r.captions)]
        if not keep:
            continue
        meta = dict(r.meta)
        langs = r.meta.get(column)
        if isinstance(langs, list) and len(langs) == len(r.captions):
            meta[column] = [langs[i] for i in keep]
        out.append(replace(r, captions=[r.captions[i] for i in keep], meta=meta))
    return out


def filter_captions(
    records: Sequence[Record], positions: Sequence[int], languages: Sequence[str]
) -> list[Record]:
    """`select_captions` by position, then `keep_languages` (data.caption_select, data.caption_langs)."""
    return keep_languages(select_captions(records, positions), languages)
