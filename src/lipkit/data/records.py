"""What every data source yields: a `Record` (an image and its captions, not decoded) or a `Skip` (a row
or sample that cannot be used, and why), and how captions and JSON metadata are parsed. Below every
source kind (data/sources/): a new kind builds Records and Skips with `caption_record`.

Rows that cannot be used are never dropped silently: scanning yields a `Skip` with a reason from
`REASONS`, and the readers return the counts next to the records.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipkit.data.image_policy import IMAGE_REASONS, VIDEO_REASONS

CAPTION_KEYS = ("captions", "caption", "text", "texts", "txt")  # looked up after data.caption_column

REASONS = {
    **IMAGE_REASONS,
    **VIDEO_REASONS,
    "no_image": "the row or sample names no image",
    "no_caption": "no non-empty caption",
    "no_label": "the sample has no class label",
    "bad_text": "the caption or metadata text is not valid UTF-8 / JSON",
    "bad_row": "the table line cannot be parsed",
    "truncated_shard": "the tar shard ends in the middle of a file (samples after it are lost)",
    "corrupt_shard": "the tar shard has a damaged header or trailing garbage (samples after it are lost)",
    "unreadable_shard": "the tar shard cannot be opened",
}


@dataclass
class Record:
    image: Path  # the image file; for inline bytes, the file that holds them (parquet, shard)
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # the name of the sample in every format (default: the image path)
    data: bytes | None = None  # encoded image bytes when the source stores them inline
    frames: Any = None  # a clip or slice stack (data/frames.py Frames): decoded instead of `image`

    def __post_init__(self) -> None:
        if not self.key:
            self.key = str(self.image)

    @property
    def source(self) -> Path | bytes:
        """What to decode: the inline bytes when the source stores them (read once here: a lazy record
        fetches them on each access), else the image file."""
        data = self.data
        return data if data is not None else self.image


@dataclass
class Skip:
    """A row or sample that cannot be used, and why (a key of REASONS)."""

    reason: str
    key: str
    detail: str = ""
    count: int = 1  # samples lost (a broken shard may take several with it)


# -- captions ------------------------------------------------------------------------------------


def has_surrogates(text: str) -> bool:
    """True for text that came from undecodable bytes (or holds lone surrogates): it is not UTF-8."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_captions(value: Any) -> list[str] | None:
    """Captions from a cell: a string (a JSON list in a string is parsed), or a list of strings. Empty
    and whitespace-only captions are dropped. None when the value cannot be captions at all."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [text]
        else:
            value = [text]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [str(value)]  # a number in a text column
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        return None if value is not None else []
    out = []
    for c in value:
        if c is None or isinstance(c, dict | list):
            continue
        text = str(c).strip()
        if text and not has_surrogates(text):
            out.append(text)
        elif text:
            return None
    return out


def caption_record(
    image: Path, captions: Any, meta: dict[str, Any], key: str, data: bytes | None = None
) -> Record | Skip:
    key = key or str(image)
    caps = parse_captions(captions)
    if caps is None:
        return Skip("bad_text", key, "captions are not text")
    if not caps:
        return Skip("no_caption", key, "no non-empty caption")
    return Record(image, caps, meta, key=key, data=data)


def parse_json_meta(raw: bytes, caption_column: str = "captions") -> tuple[Any, dict[str, Any]] | Skip:
    """(captions or None, other fields) from a sample's JSON; a Skip when it is not UTF-8 JSON."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return Skip("bad_text", "", f"JSON metadata: {type(e).__name__}")
    if not isinstance(obj, dict):
        return Skip("bad_text", "", "JSON metadata is not an object")
    captions, used = None, caption_column
    for name in (caption_column, *CAPTION_KEYS):
        if obj.get(name) not in (None, "", []):
            captions, used = obj[name], name
            break
    # the other caption-like fields stay metadata (a data.caption_mix source may be named `text`)
    meta = {k: v for k, v in obj.items() if k not in (caption_column, used)}
    return captions, meta


def collect(items: Iterable[Record | Skip]) -> tuple[list[Record], Counter[str]]:
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    for item in items:
        if isinstance(item, Skip):
            skipped[item.reason] += item.count
        else:
            records.append(item)
    return records, skipped


def describe(skipped: Counter[str] | dict[str, int]) -> str:
    """'3 corrupt_image, 1 no_caption' (largest first)."""
    return ", ".join(f"{n} {r}" for r, n in sorted(skipped.items(), key=lambda x: (-x[1], x[0])) if n)


def spread_subset(records: list, n: int) -> list:
    """`n` of `records` spread evenly over them (every len/n-th row, in order; all of them for n = 0 or
    n ≥ len): a capped evaluation still sees every part of a split that is sorted by class."""
    if not n or n >= len(records):
        return records
    return [records[i * len(records) // n] for i in range(n)]
