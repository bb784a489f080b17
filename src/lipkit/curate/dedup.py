"""`lipkit data dedup`: drop the rows of a source whose image (or, on request, whose caption set) repeats an
earlier row's, keeping the first of each group.

Three kinds of duplicate, checked in this order; a row dropped by one is not looked at again:

- exact: the same decoded pixels. The key is SHA-256 of the image as lipkit decodes it (EXIF orientation
  applied, transparency on white, RGB) at its full size, with that size: a PNG saved again with other
  compression or metadata is caught, a byte-identical file trivially so.
- near: image embeddings of a checkpoint (`lipkit embed`'s output, reused or written to OUT/embeddings)
  propose candidate pairs, a pixel check confirms them. Candidates: each image's `neighbours` nearest
  images by cosine similarity of the L2-normalised embeddings (exact FAISS inner-product search), kept
  when the similarity is at least `min_similarity`; with `neighbours` 0, every pair above
  `min_similarity` (FAISS range search); rows already dropped as exact copies are left out of the
  search (they would crowd the neighbour lists). The pixel distance of a pair decodes both images as training
  does at 32×32 px, converts the difference to YCbCr (BT.601, as JPEG stores it) and takes the mean of
  the luma difference over every 2×2 window and of the chroma difference vector over every 4×4 window
  (JPEG keeps chroma at half resolution); the distance is the 3rd largest of those window means, luma
  or chroma, in 8-bit levels (the two worst windows are ignored). A re-encode spreads small errors over
  the whole image; a different image that looks alike (the same drawing with another skin tone) differs
  by a whole patch. A candidate is a duplicate when the distance is at most `max_pixel_distance`.
- caption (opt-in, `captions=True`): the same caption set after collapsing whitespace and case. Off by
  default: distinct images often share captions (on the built-in emoji table two artists' drawings of
  every concept do, half of its rows).

Rows are taken in source order: a row is dropped when it duplicates a row already kept (a candidate that
was itself dropped stands for the row that was kept in its place), so every dropped row names a kept one
and chains (A≈B, B≈C, A≉C) do not drop C.

OUT (a folder; the source is never touched):
  train.jsonl         the kept rows (every column, image paths made absolute, `key`) — or shards/ for
                      sources that hold images inline (`lipkit.curate.pairs_out`)
  dedup_report.json   options, counts, every dropped row {"key", "duplicate_of", "reason": exact | near |
                      caption, and for near: "similarity", "pixel_distance"}, rows whose image could not
                      be decoded (kept: dedup does not judge them)
  embeddings/         the image embeddings (`lipkit embed`'s format, resumable) unless `embeddings` names
                      another folder

Measured on the noisy benchmark of the emoji table (docs/curation.md, bench/curate_dedup.py). Not done:
cluster-wise semantic deduplication (SemDeDup's within-cluster threshold, which drops distinct images
that mean the same), crops/flips/resizes beyond the centre crop, approximate search for collections too
large for an exact index, and thumbnails kept on disk (3 KB of memory per image here).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import write_json_atomic
from lipkit.curate.cluster import check_out_dir, image_embeddings
from lipkit.curate.pairs_out import SHARDS, write_pairs
from lipkit.data.images import image_pixels, open_image, upright_rgb
from lipkit.data.records import Record
from lipkit.errors import UserError, import_optional
from lipkit.search.collection import collect
from lipkit.search.embed import progress_bar

TABLE = "train.jsonl"
REPORT = "dedup_report.json"
OUR_FILES = (TABLE, SHARDS, REPORT, "embeddings")
THUMB = 32  # the pixel check's decode size
LUMA_WINDOW, CHROMA_WINDOW, IGNORED_WINDOWS = 2, 4, 2
YCBCR = np.array(  # BT.601 full range, as JPEG: rows Y, Cb, Cr
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32
)
SEARCH_BATCH = 4096


# -- the pieces, each testable alone ----------------------------------------------------------------


def normalise_caption(text: str) -> str:
    return " ".join(text.split()).casefold()


def caption_key(captions: Sequence[str]) -> frozenset[str]:
    return frozenset(normalise_caption(c) for c in captions)


def decode(src: Path | bytes) -> tuple[str, np.ndarray]:
    """(the pixel hash, the 32 px thumbnail as uint8 H×W×3) of an image; raises on an undecodable one."""
    with open_image(src) as im:
        im.load()
        rgb = upright_rgb(im)
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}\0".encode())
    h.update(rgb.tobytes())
    return h.hexdigest(), image_pixels(rgb, THUMB).permute(1, 2, 0).numpy()


def _window_means(a: np.ndarray, w: int) -> np.ndarray:
    """The mean over every w×w window of the last two axes (windows inside the image), by integral image."""
    c = np.pad(a.cumsum(-2).cumsum(-1), [(0, 0)] * (a.ndim - 2) + [(1, 0), (1, 0)])
    return (c[..., w:, w:] - c[..., :-w, w:] - c[..., w:, :-w] + c[..., :-w, :-w]) / (w * w)


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel distances (module doc) between thumbnails `a` (…×H×W×3, uint8) and `b` (broadcast)."""
    d = np.einsum("kc,...hwc->...khw", YCBCR, a.astype(np.float32) - b.astype(np.float32))
    luma = np.abs(_window_means(d[..., 0, :, :], LUMA_WINDOW))
    chroma = np.hypot(
        _window_means(d[..., 1, :, :], CHROMA_WINDOW), _window_means(d[..., 2, :, :], CHROMA_WINDOW)
    )
    k = IGNORED_WINDOWS + 1
    top = [np.partition(m.reshape(*m.shape[:-2], -1), -k, axis=-1)[..., -k] for m in (luma, chroma)]
    return np.maximum(*top)


def candidate_pairs(x: np.ndarray, neighbours: int, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of `x` (normalised here) that are among each other's `neighbours` nearest
    (either way) with cosine ≥ `min_similarity`, or every such pair when `neighbours` is 0: (pairs P×2
    int64 sorted by (j, i), similarities)."""
    faiss = import_optional(
        "faiss", lambda e: f"Near-duplicates need FAISS ({e}); run `pip install 'lipkit[search]'`."
    )
    if len(x) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    a, b, s = [], [], []
    for start in range(0, len(x), SEARCH_BATCH):
        q = x[start : start + SEARCH_BATCH]
        if neighbours > 0:
            sims, ids = index.search(q, min(neighbours + 1, len(x)))
            rows = np.repeat(np.arange(start, start + len(q)), ids.shape[1])
            ids, sims = ids.ravel(), sims.ravel()
        else:
            lims, sims, ids = index.range_search(q, np.float32(min_similarity))
            rows = start + np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64))
        ok = (ids >= 0) & (ids != rows) & (sims >= min_similarity)
        a.append(np.minimum(rows, ids)[ok])
        b.append(np.maximum(rows, ids)[ok])
        s.append(sims[ok])
    i, j, sim = np.concatenate(a), np.concatenate(b), np.concatenate(s).astype(np.float64)
    code = j.astype(np.int64) * len(x) + i
    code, first = np.unique(code, return_index=True)  # sorted by (j, i); one entry per pair
    return np.stack([code % len(x), code // len(x)], axis=1), sim[first]


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Dropped:
    key: str
    duplicate_of: str
    reason: str
    similarity: float | None = None
    pixel_distance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "duplicate_of": self.duplicate_of, "reason": self.reason}
        if self.similarity is not None:
            out.update(
                similarity=round(self.similarity, 4), pixel_distance=round(self.pixel_distance or 0, 2)
            )
        return out


@dataclass
class Found:
    """What dedup decided: each dropped row → the kept row it repeats, and why."""

    records: list[Record]
    keeper: dict[int, int] = field(default_factory=dict)  # dropped row → kept row
    dropped: dict[int, Dropped] = field(default_factory=dict)

    def drop(
        self, row: int, kept: int, reason: str, sim: float | None = None, dist: float | None = None
    ) -> None:
        self.keeper[row] = kept
        r = self.records
        self.dropped[row] = Dropped(r[row].key, r[kept].key, reason, sim, dist)

    def representative(self, row: int) -> int:
        return self.keeper.get(row, row)


def exact_pass(records: Sequence[Record], found: Found, progress: bool) -> tuple[np.ndarray, list[int]]:
    """Hash and thumbnail every image, drop exact repeats; (thumbnails N×32×32×3, undecodable rows)."""
    thumbs = np.zeros((len(records), THUMB, THUMB, 3), np.uint8)
    first: dict[str, int] = {}
    undecodable: list[int] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("decoding (exact duplicates)", total=len(records))
        for row, r in enumerate(records):
            try:
                digest, thumbs[row] = decode(r.source)
            except Exception:  # noqa: BLE001 - PIL raises many types on damaged data; the row is kept
                undecodable.append(row)
                digest = None
            if digest is not None and (kept := first.setdefault(digest, row)) != row:
                found.drop(row, kept, "exact")
            bar.advance(task)
    return thumbs, undecodable


def near_pass(
    pairs: np.ndarray, sims: np.ndarray, thumbs: np.ndarray, found: Found, max_distance: float, progress: bool
) -> int:
    """Drop every row j whose candidate i < j (or the row kept in i's place) is within `max_distance`
    pixels; the first such kept row (in source order) is the one it repeats. The pixel checks done."""
    by_row: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (i, j), s in zip(pairs.tolist(), sims.tolist(), strict=True):
        by_row[j].append((i, s))
    checks = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("checking near-duplicate candidates", total=len(by_row))
        for j in sorted(by_row):
            bar.advance(task)
            if j in found.keeper:
                continue
            best: dict[int, float] = {}
            for i, s in by_row[j]:
                k = found.representative(i)
                best[k] = max(best.get(k, -2.0), s)
            kept = sorted(best)
            dist = pixel_distance(thumbs[kept], thumbs[j])
            checks += len(kept)
            hit = np.flatnonzero(dist <= max_distance)
            if len(hit):
                k = kept[hit[0]]
                found.drop(j, k, "near", best[k], float(dist[hit[0]]))
    return checks


def caption_pass(records: Sequence[Record], found: Found) -> None:
    first: dict[frozenset[str], int] = {}
    for row, r in enumerate(records):
        if row not in found.keeper and (kept := first.setdefault(caption_key(r.captions), row)) != row:
            found.drop(row, kept, "caption")


def _kept(found: Found, bar: Any) -> Iterator[tuple[Record, dict[str, Any]]]:
    task = bar.add_task("writing kept rows", total=len(found.records) - len(found.keeper))
    for row, r in enumerate(found.records):
        if row not in found.keeper:
            bar.advance(task)
            yield r, {}


def _check_options(neighbours: int, min_similarity: float, max_pixel_distance: float) -> None:
    if neighbours < 0:
        raise UserError(
            f"--neighbours must be 0 (every pair above --min-similarity) or more, got {neighbours}."
        )
    if not -1.0 <= min_similarity <= 1.0:
        raise UserError(f"--min-similarity is a cosine similarity in [-1, 1], got {min_similarity}.")
    if neighbours == 0 and min_similarity < 0.5:
        raise UserError("--neighbours 0 compares every pair above --min-similarity; raise it to 0.5 or more.")
    if max_pixel_distance < 0:
        raise UserError(f"--max-pixel-distance must be 0 or more (8-bit levels), got {max_pixel_distance}.")


def run_dedup(
    source: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    embeddings: str | Path | None = None,
    neighbours: int = 20,
    min_similarity: float = 0.4,
    max_pixel_distance: float = 11.0,
    captions: bool = False,
    image_column: str = "image",
    caption_column: str = "captions",
    progress: bool = True,
    **embed_options: Any,
) -> dict[str, Any]:
    """`lipkit data dedup`: write SOURCE's rows less its duplicates into OUT (module doc); the report's
    summary (every field of dedup_report.json but the dropped rows)."""
    out = Path(out).expanduser()
    _check_options(neighbours, min_similarity, max_pixel_distance)
    if embeddings is not None and checkpoint is None:
        raise UserError("--embeddings needs --checkpoint, the checkpoint that made them (it is checked).")
    check_out_dir(out, OUR_FILES, [source])
    records = collect(source, image_column, caption_column)
    if not records:
        raise UserError(f"'{source}' has no usable rows; there is nothing to deduplicate.")
    found = Found(records)
    thumbs, undecodable = exact_pass(records, found, progress)
    near: dict[str, Any] | None = None
    if checkpoint is not None:
        out.mkdir(parents=True, exist_ok=True)
        emb = image_embeddings(
            checkpoint, source, embeddings or out / "embeddings", records=records,
            image_column=image_column, caption_column=caption_column, progress=progress, **embed_options,
        )  # fmt: skip
        # rows already dropped as exact copies would crowd the neighbour lists; rows this pass could not
        # decode (the embedder could) have no thumbnail: both are left out of the search
        skip = set(found.keeper) | set(undecodable)
        take = np.array([r not in skip for r in emb.rows], dtype=bool)
        rows = np.asarray(emb.rows, dtype=np.int64)[take]
        pairs, sims = candidate_pairs(np.asarray(emb.x)[take], neighbours, min_similarity)
        pairs = rows[pairs]  # embedding rows → record rows (order kept)
        checks = near_pass(pairs, sims, thumbs, found, max_pixel_distance, progress)
        near = {"embeddings": str(emb.path.resolve()), "candidate_pairs": len(pairs), "pixel_checks": checks}
    if captions:
        caption_pass(records, found)
    with progress_bar(progress) as bar:
        name, written, lost = write_pairs(out, TABLE, _kept(found, bar), image_column, caption_column)
    reasons = [d.reason for d in found.dropped.values()]
    summary = {
        "format": "lipkit-dedup",
        "source": str(source),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "options": {
            "exact": "sha256 of the decoded RGB pixels and size",
            "near": checkpoint is not None,
            "neighbours": neighbours,
            "min_similarity": min_similarity,
            "max_pixel_distance": max_pixel_distance,
            "captions": captions,
        },
        "rows": len(records),
        "kept": written,
        "dropped": {r: reasons.count(r) for r in ("exact", "near", "caption")},
        "near_search": near,
        "undecodable": [records[i].key for i in undecodable],
        "unreadable_when_written": [s.key for s in lost],
        "output": name,
    }
    dropped = [found.dropped[row].to_dict() for row in sorted(found.dropped)]
    write_json_atomic(out / REPORT, {**summary, "dropped_rows": dropped})
    return summary
