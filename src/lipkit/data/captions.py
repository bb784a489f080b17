"""Caption selection (and captions made from metadata) that depends only on a record's own columns."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import replace

from lipkit.data.records import Record
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


def add_meta_captions(
    records: Sequence[Record], templates: Sequence[str], column: str = "langs"
) -> list[Record]:
    """Append one caption per template filled from the row's own columns, e.g. "a {category} emoji:
    {subcategory}" (data.meta_captions; class names as captions, as in UniCL, Yang et al., 2022). A
    template naming a column the row lacks (or leaves empty) adds nothing to that row. A parallel
    `column` list (languages) gets "meta" for each added caption."""
    if not templates:
        return list(records)
    out = []
    for r in records:
        added = []
        for t in templates:
            values = [r.meta.get(name) for name in _fields(t)]
            if any(v is None or isinstance(v, list | dict) or not str(v).strip() for v in values):
                continue  # the row lacks (or leaves empty) a column the template names
            try:
                text = t.format(**r.meta)
            except (KeyError, IndexError, ValueError, TypeError):
                continue
            if text.strip():
                added.append(text)
        if not added:
            out.append(r)
            continue
        meta = dict(r.meta)
        langs = r.meta.get(column)
        if isinstance(langs, list) and len(langs) == len(r.captions):
            meta[column] = langs + ["meta"] * len(added)
        out.append(replace(r, captions=r.captions + added, meta=meta))
    return out


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def check_meta_templates(templates: Sequence[str]) -> None:
    """A data.meta_captions entry must be a format string whose fields are column names."""
    for t in templates:
        try:
            parsed = list(string.Formatter().parse(t))
        except ValueError as e:
            raise UserError(
                f"data.meta_captions entry {t!r} is not a format string ({e}); fix its braces."
            ) from e
        fields = [(f, spec) for _, f, spec, _ in parsed if f is not None]
        if not fields:
            raise UserError(
                f"data.meta_captions entry {t!r} names no column; put column names in braces, "
                "e.g. 'an emoji of {subcategory}'."
            )
        for f, spec in fields:
            if not f or f.isdigit() or any(c in f for c in ".[") or "{" in (spec or ""):
                raise UserError(
                    f"data.meta_captions entry {t!r} has the field {{{f}{':' + spec if spec else ''}}}; "
                    "fields must be plain column names (no positional {}, attribute, index or nested fields)."
                )


def add_meta_captions_checked(
    records: Sequence[Record], templates: Sequence[str], source: str
) -> list[Record]:
    """`add_meta_captions`, with a clear error when the templates fill no caption for any of `records`
    (after the caption selection): they name columns these rows do not have."""
    out = add_meta_captions(records, templates)
    if (
        templates
        and records
        and sum(map(len, (r.captions for r in out))) == sum(map(len, (r.captions for r in records)))
    ):
        columns = sorted({k for r in records[:100] for k in r.meta})
        raise UserError(
            f"data.meta_captions {list(templates)} filled no caption in {source}: its rows have the columns "
            f"{', '.join(columns) or '(none)'}; name one of those in braces."
        )
    return out


def filter_captions(
    records: Sequence[Record],
    positions: Sequence[int],
    languages: Sequence[str],
    meta_templates: Sequence[str] = (),
) -> list[Record]:
    """`select_captions` by position, then `keep_languages`, then `add_meta_captions` (data.caption_select,
    data.caption_langs, data.meta_captions)."""
    return add_meta_captions(keep_languages(select_captions(records, positions), languages), meta_templates)


def captioned_records(records: Sequence[Record], source: str) -> list[Record]:
    """The records that have a caption to train on (a class folder's or a label set's have none of their
    own); none at all is a UserError that suggests data.meta_captions over their label columns."""
    captioned = [r for r in records if r.captions]
    if records and not captioned:
        columns = sorted({k for r in records[:100] for k in r.meta})
        example = columns[0] if columns else "class"
        raise UserError(
            f"The training source {source} has images but no captions; give each a caption from its labels "
            f"with data.meta_captions, e.g. ['a photo of a {{{example}}}.'] (its columns: {', '.join(columns) or 'none'})."
        )
    return captioned
