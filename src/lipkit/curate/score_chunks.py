"""The chunks of a `lipkit data score` job (see `curate.score`): the source cut into chunks of records in
source order, each chunk's image embeddings (decoded and embedded by `search.embed_chunks`, the one
decode path of `lipkit embed`, or read from a `lipkit embed` folder), its captions embedded once each,
and the cosine score of every (image, caption) pair; a chunk file is trusted only for the same records
(a digest of their keys, captions and images)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.data.records import Record, Skip
from lipkit.errors import UserError
from lipkit.search.embed_chunks import compute_chunk
from lipkit.search.embeddings_dir import load_embeddings
from lipkit.search.encode import Towers

ImageLookup = Callable[[Record], np.ndarray | None]


def image_identity(record: Record) -> str:
    """What changes when the record's image does: a digest of inline bytes, else the file's path, size
    and modification time (a missing file: its path alone)."""
    data = record.data
    if data is not None:
        return hashlib.sha256(data).hexdigest()[:16]
    try:
        st = os.stat(record.image)
    except OSError:
        return str(record.image)
    return f"{record.image}:{st.st_size}:{st.st_mtime_ns}"


def chunk_digest(records: Sequence[Record]) -> str:
    """A chunk's keys, captions and images: a finished chunk is reused only for the same pairs."""
    h = hashlib.sha256()
    for r in records:
        h.update(
            "\x1f".join([r.key, image_identity(r), *r.captions]).encode("utf-8", "surrogatepass") + b"\0"
        )
    return h.hexdigest()[:32]


def chunks(items: Iterator[Record | Skip], size: int) -> Iterator[tuple[list[Record], list[Skip]]]:
    """`size` records at a time (the last chunk shorter), with the Skips read among them."""
    records: list[Record] = []
    skips: list[Skip] = []
    for item in items:
        (skips if isinstance(item, Skip) else records).append(item)  # type: ignore[arg-type]
        if len(records) == size:
            yield records, skips
            records, skips = [], []
    if records or skips:
        yield records, skips


def embeddings_lookup(emb_dir: str | Path, checkpoint_fp: str, source: str) -> ImageLookup:
    """Image embeddings of a `lipkit embed` folder of the same checkpoint: by the image file's absolute
    path, and by key when that folder embedded this same source (shard keys repeat across sources)."""
    e = load_embeddings(emb_dir)
    if e.manifest.get("fingerprint", {}).get("checkpoint") != checkpoint_fp:
        raise UserError(
            f"The embeddings in '{emb_dir}' were made with another checkpoint; embed with this one "
            "(`lipkit embed CHECKPOINT SOURCE DIR`) or leave out --embeddings."
        )
    if "onnx" in e.manifest.get("fingerprint", {}):
        raise UserError(
            f"The embeddings in '{emb_dir}' come from the int8 ONNX towers (`lipkit embed --int8`); scores use "
            "the checkpoint's own towers: embed without --int8, or leave out --embeddings."
        )
    image = e.image()
    same_source = e.manifest.get("source") == str(Path(source).expanduser().resolve())
    by: dict[str, int] = {}
    for i, item in enumerate(e.items):
        if item.get("path"):
            by["p:" + item["path"]] = i
        if same_source and item.get("key"):
            by["k:" + item["key"]] = i

    def find(record: Record) -> np.ndarray | None:
        i = by.get("k:" + record.key)
        if i is None:  # an inline image's record names its container (a shard): no item has that path
            i = by.get("p:" + str(Path(record.image).resolve()))
        return None if i is None else np.asarray(image[i], dtype=np.float32)

    return find


def _caption_embeddings(
    towers: Towers, records: Sequence[Record], rows: np.ndarray, batch_size: int, advance: Callable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings of each distinct caption, caption index per (row, caption), offsets per row)."""
    distinct: dict[str, int] = {}
    index: list[int] = []
    offsets = [0]
    for r in rows.tolist():
        index.extend(distinct.setdefault(c, len(distinct)) for c in records[r].captions)
        offsets.append(len(index))
    texts = list(distinct)
    parts = []
    for i in range(0, len(texts), batch_size):
        parts.append(towers.texts(texts[i : i + batch_size]))
        advance(len(parts[-1]))
    emb = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, towers.dim), np.float32)
    return emb, np.asarray(index, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def score_chunk(
    towers: Towers,
    records: Sequence[Record],
    *,
    lookup: ImageLookup | None = None,
    batch_size: int = 256,
    workers: int = 0,
    advance_images: Callable[[int], Any] = lambda n: None,
    advance_texts: Callable[[int], Any] = lambda n: None,
) -> dict[str, np.ndarray]:
    """The arrays of one chunk file: `rows` scored (positions in `records`), `offsets` into `scores`
    (one per caption, float32), the rows left out with why, and the chunk's digest."""
    n = len(records)
    image = np.zeros((n, towers.dim), np.float32)
    have = np.zeros(n, dtype=bool)
    bad_rows = [i for i in range(n) if not records[i].captions]  # e.g. a class folder's images
    bad_why = ["no caption to score"] * len(bad_rows)
    todo = []
    for i in range(n):
        found = lookup(records[i]) if lookup is not None and records[i].captions else None
        if found is not None:
            image[i], have[i] = found, True
        elif records[i].captions:
            todo.append(i)
    advance_images(int(have.sum()) + len(bad_rows))
    if todo:
        got = compute_chunk(
            towers,
            records,
            todo,
            has_text=False,
            batch_size=batch_size,
            workers=workers,
            advance=advance_images,
        )
        image[got["rows"]], have[got["rows"]] = got["image"], True
        bad_rows += got["bad_rows"].tolist()
        bad_why += got["bad_why"].tolist()
    rows = np.flatnonzero(have)
    text, index, offsets = _caption_embeddings(towers, records, rows, batch_size, advance_texts)
    owner = np.repeat(rows, np.diff(offsets))
    scores = np.einsum("ij,ij->i", text[index], image[owner]) if len(index) else np.zeros(0)
    order = np.argsort(bad_rows, kind="stable")
    return {
        "digest": np.asarray(chunk_digest(records)),
        "rows": rows.astype(np.int64),
        "offsets": offsets,
        "scores": scores.astype(np.float32),
        "bad_rows": np.asarray(bad_rows, dtype=np.int64)[order],
        "bad_why": np.asarray(bad_why, dtype=str)[order] if bad_why else np.zeros(0, dtype="<U1"),
    }


def load_chunk(path: Path, digest: str) -> dict[str, np.ndarray] | None:
    """A finished chunk file of these very records (same keys and captions), else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None
    need = {"digest", "rows", "offsets", "scores", "bad_rows", "bad_why"}
    return arrays if need <= set(arrays) and str(arrays["digest"]) == digest else None
