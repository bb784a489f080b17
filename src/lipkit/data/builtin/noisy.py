"""`lipkit data build noisy`: a copy of a captions table with known noise injected, and the ground truth
kept apart: the benchmark of data curation (`lipkit data dedup`, `score`, `filter`).

Any source `data.train` accepts works (default: the emoji training table in the user cache). From its N
usable rows, with one seeded `random.Random`:

- mispaired: round(f_m·N) rows (at least 2 when f_m > 0) get *another* row's captions, all of them (and
  the `langs` list that goes with them, when there is one). The donors are a derangement of the chosen
  rows: a random cyclic shift, then repaired by swaps so that no row receives a caption set equal to its
  own (captions compared after collapsing whitespace and case: two rows of one concept drawn by two
  artists share their captions, and such a swap would not be noise).
- duplicates: round(f_d·N) rows (after mispairing) are copied once under a new key; half of the copies
  (rounded down) are re-encoded as JPEG at `jpeg_quality` (decoded as lipkit decodes: transparency on
  white), the others are byte-for-byte copies.

Every row is then shuffled into one order and given an opaque key (a hash of the seed and its position
in the plan), every image is written under `images/<key>.<ext>` (byte copies for all but the re-encoded
ones), and only key, image, captions (and `langs`) are kept: other columns describe the image (a
label, a class) and would tell which rows are mispaired. Nothing here knows what the data are.

OUT (written whole, atomically)::

    train.jsonl    {"key", "image": "images/<key>.png", "captions": [...], "langs"?: [...]}
    images/        one file per row
    truth.jsonl    {"key", "mispaired": bool, "duplicate_of": key | null, "reencoded": bool,
                    "source_key": the row's key in the source}   (never read by training)
    summary.json   options, counts, the source and its fingerprint; written last

Not modelled: near-duplicates other than JPEG re-encodes (crops, resizes, watermarks), captions that
are wrong in part, or duplicates that bring captions of their own.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir
from rich.progress import Progress

from lipkit.atomic import write_dir, write_json_atomic
from lipkit.data.builtin.common import check_build_out, fingerprint, usable_records
from lipkit.data.convert import image_bytes
from lipkit.data.emoji import default_root
from lipkit.data.images import open_image, upright_rgb
from lipkit.data.records import Record, describe
from lipkit.errors import UserError

FORMAT = "lipkit-noisy"
CAPTION_PARALLEL = "langs"  # a per-caption list (data.caption_langs reads it): it moves with the captions


def default_source() -> Path:
    """The emoji training table in the user cache (`lipkit data build emoji` writes it)."""
    return default_root() / "train.jsonl"


def default_out() -> Path:
    return Path(user_cache_dir("lipkit")) / "datasets" / "noisy"


def caption_signature(captions: Sequence[str]) -> frozenset[str]:
    """A row's caption set, whitespace collapsed and case folded."""
    return frozenset(" ".join(c.split()).casefold() for c in captions)


def derangement(chosen: Sequence[int], signatures: Sequence[Any], rng: random.Random) -> dict[int, int]:
    """receiver → donor over `chosen`: no row its own donor, and none a donor with its own signature."""
    order = list(chosen)
    rng.shuffle(order)
    m = len(order)
    donor = {order[k]: order[(k + 1) % m] for k in range(m)}
    for r in order:
        if signatures[donor[r]] != signatures[r]:
            continue
        for s in rng.sample(order, m):  # swap donors with another receiver where both end up different
            a, b = donor[r], donor[s]
            if (
                s != r
                and b != r
                and a != s
                and signatures[b] != signatures[r]
                and signatures[a] != signatures[s]
            ):
                donor[r], donor[s] = b, a
                break
        else:
            raise UserError(
                f"Too many of the {m} rows to mispair share their captions to give each other's captions "
                "to one another; lower --mispaired."
            )
    return donor


@dataclass
class Planned:
    """One row of the noisy table: the source row it shows, whose captions it carries, and what it is."""

    row: int
    captions_of: int
    copy_of: int | None = None  # a copy: the source row it copies (the original row shows it too)
    reencoded: bool = False
    key: str = ""


def plan_rows(signatures: Sequence[Any], mispaired: float, duplicates: float, seed: int) -> list[Planned]:
    """The noisy table's rows, in their final order, with their keys (see the module doc)."""
    n = len(signatures)
    rng = random.Random(seed)
    m = round(mispaired * n)
    m = max(m, 2) if mispaired > 0 else 0
    if m > n:
        raise UserError(f"--mispaired {mispaired} needs at least 2 rows; the source has {n}.")
    donor = derangement(sorted(rng.sample(range(n), m)), signatures, rng) if m else {}
    rows = [Planned(i, donor.get(i, i)) for i in range(n)]
    copied = rng.sample(range(n), round(duplicates * n))
    reencoded = set(copied[: len(copied) // 2])
    rows += [Planned(i, rows[i].captions_of, i, i in reencoded) for i in copied]
    order = list(range(len(rows)))
    rng.shuffle(order)
    for k, p in enumerate(rows):
        p.key = hashlib.sha256(f"{seed}\0{k}\0{p.row}".encode()).hexdigest()[:16]
    return [rows[k] for k in order]


def _check_options(mispaired: float, duplicates: float, jpeg_quality: int) -> None:
    if not 0.0 <= mispaired <= 1.0:
        raise UserError(f"--mispaired must be a fraction in [0, 1], got {mispaired}; pass e.g. 0.3.")
    if not 0.0 <= duplicates <= 1.0:
        raise UserError(f"--duplicates must be a fraction in [0, 1], got {duplicates}; pass e.g. 0.1.")
    if not 1 <= jpeg_quality <= 95:
        raise UserError(f"--jpeg-quality must be in 1..95 (PIL's scale), got {jpeg_quality}; pass e.g. 75.")


def _jpeg(data: bytes, quality: int) -> bytes | None:
    """The image decoded as lipkit decodes it (EXIF upright, transparency on white), saved as JPEG."""
    try:
        with open_image(data) as im:
            im.load()
            rgb = upright_rgb(im)
    except Exception:  # noqa: BLE001 - an image PIL cannot decode is copied as it is instead
        return None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _row(p: Planned, records: Sequence[Record], image: str) -> dict[str, Any]:
    donor = records[p.captions_of]
    row: dict[str, Any] = {"key": p.key, "image": image, "captions": list(donor.captions)}
    langs = donor.meta.get(CAPTION_PARALLEL)
    if isinstance(langs, list) and len(langs) == len(donor.captions):
        row[CAPTION_PARALLEL] = list(langs)
    return row


def _truth(p: Planned, duplicate_of: str | None, records: Sequence[Record]) -> dict[str, Any]:
    return {
        "key": p.key,
        "mispaired": p.captions_of != p.row,
        "duplicate_of": duplicate_of,
        "reencoded": p.reencoded,
        "source_key": records[p.row].key,
    }


def _write(tmp: Path, plan: list[Planned], records: Sequence[Record], quality: int, progress: bool) -> int:
    """images/, train.jsonl and truth.jsonl of `plan` into `tmp`; the number of re-encoded copies."""
    (tmp / "images").mkdir()
    originals = {p.row: p.key for p in plan if p.copy_of is None}
    rows, truth, reencoded = [], [], 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("writing the noisy table", total=len(plan))
        for p in plan:
            data, ext = image_bytes(records[p.row])  # type: ignore[misc] # usable rows only (checked)
            if p.reencoded and (jpeg := _jpeg(data, quality)) is not None:
                data, ext, reencoded = jpeg, "jpg", reencoded + 1
            else:
                p.reencoded = False
            name = f"images/{p.key}.{ext}"
            (tmp / name).write_bytes(data)
            rows.append(_row(p, records, name))
            truth.append(_truth(p, originals[p.row] if p.copy_of is not None else None, records))
            bar.advance(task)
    for file, lines in (("train.jsonl", rows), ("truth.jsonl", truth)):
        (tmp / file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "utf-8")
    return reencoded


def build_noisy(
    source: str | Path | None = None,
    out: str | Path | None = None,
    *,
    mispaired: float = 0.3,
    duplicates: float = 0.1,
    jpeg_quality: int = 75,
    seed: int = 0,
    force: bool = False,
    image_column: str = "image",
    caption_column: str = "captions",
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or reuse) the noisy copy of `source` in `out` (see the module doc); its summary."""
    _check_options(mispaired, duplicates, jpeg_quality)
    src = Path(source).expanduser() if source is not None else default_source()
    if source is None and not src.is_file():
        raise UserError(
            f"The default source '{src}' does not exist; build it with `lipkit data build emoji` or pass "
            "--source TABLE."
        )
    dest = Path(out).expanduser() if out is not None else default_out()
    old = check_build_out(dest, [src], FORMAT, "noisy build")
    records, skipped = usable_records(src, image_column, caption_column)
    options = {"mispaired": mispaired, "duplicates": duplicates, "jpeg_quality": jpeg_quality, "seed": seed}
    fp = fingerprint(records)
    if (
        old is not None
        and not force
        and old.get("options") == options
        and old.get("source_fingerprint") == fp
    ):
        return old
    if len(records) < 2:
        raise UserError(f"'{src}' has {len(records)} usable row(s); a noisy copy needs at least 2.")
    plan = plan_rows([caption_signature(r.captions) for r in records], mispaired, duplicates, seed)

    def write(tmp: Path) -> dict[str, Any]:
        reencoded = _write(tmp, plan, records, jpeg_quality, progress)
        copies = sum(p.copy_of is not None for p in plan)
        summary = {
            "format": FORMAT,
            "source": str(src.resolve()),
            "source_fingerprint": fp,
            "options": options,
            "rows": len(plan),
            "source_rows": len(records),
            "skipped_source_rows": skipped,
            "mispaired": sum(p.captions_of != p.row for p in plan),
            "copies": copies,
            "reencoded": reencoded,
            "byte_copies": copies - reencoded,
            "files": {"table": "train.jsonl", "truth": "truth.jsonl"},
        }
        write_json_atomic(tmp / "summary.json", summary)
        return summary

    result: dict[str, Any] = {}
    write_dir(dest, lambda tmp: result.update(write(tmp)))
    if skipped:
        result["note"] = f"skipped {sum(skipped.values())} unusable source rows ({describe(skipped)})"
    return result
