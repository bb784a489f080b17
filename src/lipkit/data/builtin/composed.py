"""`lipkit data build composed`: a composed-image-retrieval benchmark from tables whose labels name variants
of one concept, "NAME: ATTRIBUTE[, ATTRIBUTE]" (the emoji table's "waving hand: dark skin tone").

Each source table is copied as a gallery table (same images, captions and columns) whose rows carry the
queries they answer (data.composed): a reference image of the same concept drawn in the same style, and
the words that turn it into the row's — one attribute added ("waving hand" + "with dark skin tone" →
"waving hand: dark skin tone") or one attribute replaced by another of its kind ("… light skin tone" +
"with dark skin tone"). Attributes are skin tones, hair (colour, curly, bald) and beards; concepts whose
variants differ otherwise (flags, families, couples) give no queries. Splits: train (for RTD's text
triplets), test (test-style: the held-out artist) and novel (test-novel: unseen concepts).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from lipkit.atomic import write_json_atomic
from lipkit.data.builtin.common import check_build_out, fingerprint, usable_records
from lipkit.data.composed import COMPOSED
from lipkit.data.emoji import default_root
from lipkit.errors import UserError

FORMAT, VERSION = "lipkit-composed", 1
SPLITS = {"train": "train.jsonl", "test": "test-style.jsonl", "novel": "test-novel.jsonl"}


def default_out() -> Path:
    return Path(user_cache_dir("lipkit")) / "datasets" / "composed"


def attribute_kind(part: str) -> str | None:
    if part.endswith("skin tone"):
        return "skin tone"
    if part.endswith(" hair") or part == "bald":
        return "hair"
    return "beard" if part == "beard" else None


def variant(label: str) -> tuple[str, frozenset[str]] | None:
    """'waving hand: dark skin tone' → ('waving hand', {'dark skin tone'}); None when a part after the
    colon is not an attribute."""
    name, _, rest = label.partition(": ")
    parts = [p.strip() for p in rest.split(",")] if rest else []
    if any(attribute_kind(p) is None for p in parts):
        return None
    return name, frozenset(parts)


def modification(reference: frozenset[str], target: frozenset[str]) -> str | None:
    """The words turning the reference's attributes into the target's, or None (not one step)."""
    added, removed = target - reference, reference - target
    if len(added) != 1 or len(removed) > 1:
        return None
    (a,) = added
    if removed and attribute_kind(next(iter(removed))) != attribute_kind(a):
        return None
    return "bald" if a == "bald" else f"with {a}"


def queries(rows: list[dict[str, Any]]) -> dict[int, list[tuple[int, str]]]:
    """For each row, the (reference row, words) queries it answers."""
    groups: dict[tuple, list[tuple[int, frozenset[str]]]] = defaultdict(list)
    for i, row in enumerate(rows):
        v = variant(row["captions"][0])
        if v is not None:
            groups[(row.get("style"), v[0])].append((i, v[1]))
    found: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for members in groups.values():
        for t, attrs_t in members:
            for r, attrs_r in members:
                words = modification(attrs_r, attrs_t) if r != t else None
                if words is not None:
                    found[t].append((r, words))
    return found


def _split_rows(source: Path, out: Path) -> tuple[list[dict[str, Any]], str]:
    records, _ = usable_records(source)
    rows = []
    for r in records:
        meta = {k: v for k, v in r.meta.items() if k != COMPOSED}
        rows.append({"image": os.path.relpath(r.image, out), "captions": r.captions, **meta})
    return rows, fingerprint(records)


def build_composed(out: str | Path | None = None, root: Path | None = None, force: bool = False) -> dict:
    """Build (or reuse) the benchmark in `out` from the emoji tables under `root`; its summary."""
    root = Path(root).expanduser() if root else default_root()
    sources = {split: root / name for split, name in SPLITS.items()}
    if not all(p.is_file() for p in sources.values()):
        raise UserError(f"The emoji tables are not in '{root}'; build them first: lipkit data build emoji.")
    dest = Path(out).expanduser() if out is not None else default_out()
    old = check_build_out(dest, list(sources.values()), FORMAT, "composed-retrieval build")
    built = {split: _split_rows(path, dest) for split, path in sources.items()}
    fps = {split: fp for split, (_, fp) in built.items()}
    if old is not None and not force and old.get("version") == VERSION and old.get("fingerprints") == fps:
        return old
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, (rows, _) in built.items():
        found = queries(rows)
        for t, qs in found.items():
            rows[t][COMPOSED] = [{"reference": rows[r]["image"], "text": w} for r, w in qs]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (dest / f"{split}.jsonl").write_text(text, encoding="utf-8")
        counts[split] = {"images": len(rows), "queries": sum(len(q) for q in found.values())}
    summary = {"format": FORMAT, "version": VERSION, "fingerprints": fps, "splits": counts}
    write_json_atomic(dest / "summary.json", summary, indent=2)
    return summary
