"""`lipkit data associate`: give each image several realistic texts retrieved from a text pool — the
realistic-text step of RealSyn (Gu et al., "RealSyn: An Effective and Scalable Multimodal Interleaved
Document Transformation Paradigm", 2025), which associates each image of interleaved documents with
the K semantically nearest sentences of a large text pool.

Retrieval: the pool is the distinct captions of POOL (any source; all of a row's captions, or only its
first); image embeddings x_i and pool text embeddings t_j of the same CLIP checkpoint, both unit-norm;
image i gets the K texts of largest x_i·t_j (exact FAISS inner-product search), best first. With
`exclude_own`, a pool text equal to one of the row's own captions is never returned (the next best
takes its place). The texts go to a column of their own, `captions_retrieved` (their similarities in
`captions_retrieved_scores`): caption sources stay apart in the table, and the row's own `captions` are
kept as they were.

Balanced sampling (`balanced=CLUSTERS_DIR`): RealSyn samples its final image–text set so that the
semantic clusters of its data are represented evenly, favouring the long tail. Implemented here: the
table keeps at most `per_cluster` images of each cluster of `lipkit data cluster`'s output (default:
the median size of the non-empty clusters), drawn uniformly at random (seeded); smaller clusters are
kept whole. Not implemented: RealSyn's hierarchical retrieval (texts first clustered, images matched to
text clusters, then to texts — here the search is exact over the whole pool), its balance over the
clusters of the text pool, its image-semantic-augmented synthetic texts (an LLM rewrites a retrieved
text with image details), and its extraction of images and sentences from interleaved documents.

OUT (a folder; the inputs are never touched):
  associated.jsonl  SOURCE's rows (every column, image paths made absolute, `key`) + the two columns
  or shards/        (`lipkit.curate.pairs_out`'s writer: WebDataset shards for sources holding images inline)
  associate.json    k, the pool, counts, the balance cap, the mean similarity of the first retrieved text
  embeddings/       SOURCE's image embeddings (`lipkit embed`'s format, resumable), unless `embeddings`
                    names a folder (a finished `lipkit embed` folder of SOURCE and CHECKPOINT is reused)
The pool's text embeddings are computed in memory on every run. Rows whose images cannot be decoded get
no embedding; they are left out of the table and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import write_json_atomic
from lipkit.curate.cluster import (
    Embedded,
    check_out_dir,
    image_embeddings,
    load_clusters,
    lookup,
)
from lipkit.curate.pairs_out import SHARDS, write_pairs
from lipkit.data.records import CAPTION_KEYS, parse_captions
from lipkit.data.sources.table import TABLE_EXTS, table_rows
from lipkit.errors import UserError, import_optional
from lipkit.search.collection import collect
from lipkit.search.embed import progress_bar

POOL_CAPTIONS = ("all", "first")
SEARCH_BATCH = 1024
TABLE = "associated.jsonl"
OUR_FILES = (TABLE, SHARDS, "associate.json", "embeddings")


def pool_rows(pool: str | Path, image_column: str, caption_column: str) -> list[list[str]]:
    """The captions of each row of the text pool: a .txt file (one text per line), a JSONL/CSV/TSV table
    read for its caption column alone (no images needed; else the usual caption fields), or any source
    `data.train` accepts."""
    path = Path(str(pool)).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".txt":
        return [[line.strip()] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.is_file() and suffix in TABLE_EXTS:  # rows that fail to parse are left out, as in training
        names = (caption_column, *CAPTION_KEYS)
        rows = (row for _, row, _ in table_rows(path) if row is not None)
        return [next((c for n in names if (c := parse_captions(row.get(n)))), []) for row in rows]
    return [r.captions for r in collect(pool, image_column, caption_column)]


def pool_texts(rows: Sequence[Sequence[str]], which: str = "all") -> list[str]:
    """The distinct captions of the pool's rows (all of each row's, or its first), in first-seen order."""
    if which not in POOL_CAPTIONS:
        raise UserError(f"--pool-captions must be one of {', '.join(POOL_CAPTIONS)}, got '{which}'.")
    seen: dict[str, None] = {}
    for captions in rows:
        for c in captions if which == "all" else captions[:1]:
            seen.setdefault(c, None)
    return list(seen)


def retrieve(
    images: np.ndarray,
    texts: np.ndarray,
    k: int,
    exclude: Sequence[set[int]] | None = None,
    advance: Callable[[int], None] | None = None,
    rows: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """For each image (each row of `images`, or each of its `rows`: read a batch at a time), the pool
    indices of its `k` largest inner products with the rows of `texts` (best first) and those products;
    pool indices in `exclude[i]` are skipped for image i."""
    faiss = import_optional(
        "faiss", lambda e: f"Associating texts needs FAISS ({e}); run `pip install 'lipkit[search]'`."
    )

    index = faiss.IndexFlatIP(texts.shape[1])
    index.add(np.ascontiguousarray(texts, dtype=np.float32))
    hits: list[list[int]] = []
    sims: list[list[float]] = []
    n = len(rows) if rows is not None else len(images)
    for s in range(0, n, SEARCH_BATCH):
        part = (
            images[np.asarray(rows[s : s + SEARCH_BATCH], dtype=np.int64)]
            if rows is not None
            else images[s : s + SEARCH_BATCH]
        )
        batch = np.ascontiguousarray(part, dtype=np.float32)
        skip = exclude[s : s + len(batch)] if exclude is not None else [set()] * len(batch)
        depth = min(index.ntotal, k + max((len(e) for e in skip), default=0))
        scores, ids = index.search(batch, depth)
        for row_ids, row_scores, ex in zip(ids.tolist(), scores.tolist(), skip, strict=True):
            kept = [(j, v) for j, v in zip(row_ids, row_scores, strict=True) if j >= 0 and j not in ex][:k]
            hits.append([j for j, _ in kept])
            sims.append([float(v) for _, v in kept])
        if advance:
            advance(len(batch))
    return hits, sims


def balanced_rows(
    clusters: Sequence[tuple[int, float] | None], per_cluster: int | None, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Indices (ascending) of at most `per_cluster` rows per cluster, drawn uniformly (seeded); rows
    without a cluster form one group of their own. The cap used (default: the median non-empty size)."""
    labels = np.array([-1 if c is None else c[0] for c in clusters], dtype=np.int64)
    groups, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    clustered = sizes[groups >= 0] if (groups >= 0).any() else sizes  # the unclustered group is no cluster
    cap = int(per_cluster) if per_cluster is not None else max(1, int(np.median(clustered)))
    if cap < 1:
        raise UserError(f"--per-cluster must be at least 1, got {cap}.")
    rng = np.random.default_rng(seed)
    keep = []
    for g in range(len(groups)):
        members = np.flatnonzero(inverse == g)
        keep.append(members if len(members) <= cap else rng.choice(members, cap, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64), cap


def embed_texts(
    checkpoint: str | Path, texts: list[str], device: str, batch_size: int, bar: Any
) -> np.ndarray:
    """Unit-norm embeddings of `texts` by the checkpoint's text tower, in batches on `bar`."""
    from lipkit.search.encode import Towers

    towers = Towers.of_checkpoint(checkpoint, device)
    task = bar.add_task("embedding pool texts", total=len(texts))
    out = np.zeros((len(texts), towers.dim), dtype=np.float32)
    for s in range(0, len(texts), batch_size):
        out[s : s + batch_size] = towers.texts(texts[s : s + batch_size])
        bar.advance(task, min(batch_size, len(texts) - s))
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _chosen(
    emb: Embedded, balanced: str | Path | None, per_cluster: int | None, seed: int
) -> tuple[list[int], Any]:
    """The embedded rows to associate (all, or a cluster-balanced sample) and the cap used (or None)."""
    if balanced is None:
        return list(range(len(emb.rows))), None
    found = lookup([emb.records[r] for r in emb.rows], load_clusters(balanced))
    if all(f is None for f in found):
        raise UserError(
            f"None of the images is in the clusters of '{balanced}'; pass the folder `lipkit data cluster` "
            "wrote for this SOURCE."
        )
    keep, cap = balanced_rows(found, per_cluster, seed)
    return keep.tolist(), cap


def _retrieve_rows(
    checkpoint: str | Path,
    emb: Embedded,
    chosen: list[int],
    texts: list[str],
    k: int,
    exclude_own: bool,
    device: str,
    batch_size: int,
    progress: bool,
) -> tuple[list[list[int]], list[list[float]], list[set[int]]]:
    """The pool texts retrieved for the `chosen` embedded rows, their similarities, and each row's own
    captions as pool indices (excluded from its texts with `exclude_own`)."""
    text_index = {t: j for j, t in enumerate(texts)}
    own = [{text_index[c] for c in emb.records[emb.rows[i]].captions if c in text_index} for i in chosen]
    with progress_bar(progress) as bar:
        t = embed_texts(checkpoint, texts, device, batch_size, bar)
        task = bar.add_task("retrieving", total=len(chosen))
        hits, sims = retrieve(
            emb.x, t, k, own if exclude_own else None, lambda n: bar.advance(task, n), chosen
        )
    return hits, sims, own


def run_associate(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    k: int,
    pool: str | Path,
    *,
    pool_captions: str = "all",
    exclude_own: bool = False,
    balanced: str | Path | None = None,
    per_cluster: int | None = None,
    seed: int = 0,
    embeddings: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "captions",
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """`lipkit data associate`: SOURCE's rows with K retrieved pool texts each, into OUT (module doc);
    the summary written to associate.json."""
    if k < 1:
        raise UserError(f"-k must be at least 1 (texts to retrieve per image), got {k}.")
    out = Path(out).expanduser()
    check_out_dir(out, OUR_FILES, [source, pool] + ([balanced] if balanced else []))
    texts = pool_texts(pool_rows(pool, image_column, caption_column), pool_captions)
    if not texts:
        raise UserError(
            f"The pool '{pool}' has no captions; pass a .txt file of texts or a table with a "
            f"'{caption_column}' column as --pool."
        )
    emb = image_embeddings(
        checkpoint,
        source,
        embeddings or out / "embeddings",
        image_column=image_column,
        caption_column=caption_column,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    chosen, cap = _chosen(emb, balanced, per_cluster, seed)
    hits, sims, own = _retrieve_rows(
        checkpoint, emb, chosen, texts, k, exclude_own, device, batch_size, progress
    )
    pairs = (
        (
            emb.records[emb.rows[i]],
            {
                "captions_retrieved": [texts[j] for j in h],
                "captions_retrieved_scores": [round(v, 6) for v in s],
            },
        )
        for i, h, s in zip(chosen, hits, sims, strict=True)
    )
    (out / "associate.json").unlink(missing_ok=True)
    name, n, skipped = write_pairs(out, TABLE, pairs, image_column, caption_column)
    summary = {
        "source": str(source),
        "pool": str(pool),
        "k": k,
        "pool_captions": pool_captions,
        "pool_texts": len(texts),
        "exclude_own": exclude_own,
        "balanced": str(balanced) if balanced else None,
        "per_cluster": cap,
        "seed": seed,
        "rows": len(emb.records),
        "not_embedded": len(emb.records) - len(emb.rows),
        "written": n,
        "unreadable": len(skipped),
        "own_caption_retrieved": own_hits(hits, own),
        "mean_top1_similarity": float(np.mean([s[0] for s in sims if s])) if any(sims) else None,
        "embeddings": str(emb.path),
        "table": name,
    }
    write_json_atomic(out / "associate.json", summary)
    return summary


def own_hits(hits: Sequence[Sequence[int]], own: Sequence[set[int]]) -> float | None:
    """The share of images (among those whose own captions are in the pool) with one of their own
    captions among their retrieved texts: 0 with `exclude_own`, a retrieval score without."""
    rows = [bool(set(h) & o) for h, o in zip(hits, own, strict=True) if o]
    return sum(rows) / len(rows) if rows else None
