"""`lipkit data reduce`: keep about a ratio R of a collection, cluster by cluster — the sample-selection
step of TL;DR (Wang et al., "Too Large; Data Reduction for Vision-Language Pre-Training", ICCV 2023),
on the clusters `lipkit data cluster` wrote. Also the JSONL table writer the curation commands share.

Selection. With n_c rows of SOURCE in cluster c and N = Σ n_c, cluster c keeps m_c rows: the quota
R·n_c rounded by largest remainders so that Σ m_c = round(R·N), then at least one and at most n_c (so
the total can exceed round(R·N) by up to one per small cluster). Within a cluster the m_c rows nearest
its centroid (smallest cosine distance; ties by row order) are kept — TL;DR's reading of a cluster's
representatives — or, with `pick="random"`, m_c rows drawn uniformly (seeded).

Not implemented from TL;DR: its codebook is learnt jointly with an encoder–decoder captioner (here the
clusters are plain k-means over a trained CLIP's image embeddings), and its second step, regenerating
the text of the kept samples with that captioner to repair image–text misalignment.

OUT (a folder; the input is never touched):
  reduced.jsonl   the kept rows of SOURCE, every column, image paths made absolute, `key` (the shared
  or shards/      writer of `lipkit.curate.pairs_out`: WebDataset shards for sources holding images inline)
  reduce.json     ratio, pick, seed, counts, and the rows kept per cluster
Rows of SOURCE the clustering never saw (images that could not be decoded) are left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import write_json_atomic
from lipkit.curate.cluster import check_out_dir, load_clusters, lookup
from lipkit.curate.pairs_out import SHARDS, write_pairs
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.search.collection import collect

PICKS = ("nearest", "random")
TABLE = "reduced.jsonl"
OUR_FILES = (TABLE, SHARDS, "reduce.json")


def quotas(sizes: np.ndarray, ratio: float) -> np.ndarray:
    """Rows to keep per cluster: R·n_c by largest remainders (Σ = ⌊R·N + ½⌋, ties to the lower cluster),
    then at least 1 and at most n_c for every non-empty cluster. `lipkit data filter --keep-fraction`
    (per cluster or not) keeps the same counts."""
    sizes = np.asarray(sizes, dtype=np.int64)
    share = ratio * sizes
    m = np.floor(share).astype(np.int64)
    left = int(np.floor(ratio * int(sizes.sum()) + 0.5)) - int(m.sum())
    if left > 0:
        order = np.lexsort((np.arange(len(sizes)), -(share - m)))  # largest remainder first
        m[order[:left]] += 1
    m = np.where(sizes > 0, np.maximum(m, 1), 0)
    return np.minimum(m, sizes)


def select(clusters: np.ndarray, scores: np.ndarray, ratio: float) -> np.ndarray:
    """Indices (ascending) of the rows kept: in each cluster, its quota of the rows with the smallest
    score (distance to the centroid, or a random number), ties by row index."""
    clusters = np.asarray(clusters, dtype=np.int64)
    n = len(clusters)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    m = quotas(np.bincount(clusters), ratio)
    order = np.lexsort((np.arange(n), np.asarray(scores, dtype=np.float64), clusters))
    sorted_c = clusters[order]
    starts = np.searchsorted(sorted_c, sorted_c, side="left")  # first position of each row's cluster
    rank = np.arange(n) - starts
    return np.sort(order[rank < m[sorted_c]])


def run_reduce(
    source: str | Path,
    clusters_dir: str | Path,
    out: str | Path,
    ratio: float,
    *,
    pick: str = "nearest",
    seed: int = 0,
    image_column: str = "image",
    caption_column: str = "captions",
) -> dict[str, Any]:
    """`lipkit data reduce`: write the kept rows of SOURCE into OUT (module doc); the summary."""
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"--ratio must be in (0, 1] (the share of samples to keep), got {ratio}.")
    if pick not in PICKS:
        raise UserError(f"--pick must be one of {', '.join(PICKS)}, got '{pick}'.")
    out = Path(out).expanduser()
    check_out_dir(out, OUR_FILES, [source, clusters_dir])
    found = lookup_source(source, clusters_dir, image_column, caption_column)
    records = [r for r, f in found if f is not None]
    c = np.array([f[0] for _, f in found if f is not None], dtype=np.int64)
    d = np.array([f[1] for _, f in found if f is not None], dtype=np.float64)
    scores = d if pick == "nearest" else np.random.default_rng(seed).random(len(c))
    keep = select(c, scores, ratio)
    (out / "reduce.json").unlink(missing_ok=True)
    name, n, skipped = write_pairs(
        out, TABLE, ((records[i], {}) for i in keep.tolist()), image_column, caption_column
    )
    summary = {
        "source": str(source),
        "clusters": str(clusters_dir),
        "ratio": ratio,
        "pick": pick,
        "seed": seed,
        "rows": len(found),
        "not_clustered": len(found) - len(records),
        "kept": n,
        "unreadable": len(skipped),
        "kept_per_cluster": np.bincount(c[keep], minlength=int(c.max(initial=-1)) + 1).tolist(),
        "written": name,
    }
    write_json_atomic(out / "reduce.json", summary)
    return summary


def lookup_source(
    source: str | Path, clusters_dir: str | Path, image_column: str, caption_column: str
) -> Sequence[tuple[Record, tuple[int, float] | None]]:
    """SOURCE's records with their (cluster, distance), None for those the clustering did not see; an
    error when it saw none of them (the clusters of another collection)."""
    clusters = load_clusters(clusters_dir)
    records = collect(source, image_column, caption_column)
    found = lookup(records, clusters)
    if records and all(f is None for f in found):
        raise UserError(
            f"None of the rows of '{source}' is in the clusters of '{clusters_dir}'; cluster this source with "
            f"`lipkit data cluster CHECKPOINT {source} DIR --k N` and pass that DIR."
        )
    return list(zip(records, found, strict=True))
