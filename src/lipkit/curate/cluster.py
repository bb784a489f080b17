"""`lipkit data cluster`: spherical k-means over a collection's normalised image embeddings, the shared
cluster format that `reduce`, `associate --balanced` (and MLCD-style cluster labels, `filter
--per-cluster`) read.

Spherical k-means (FAISS `faiss.Kmeans(spherical=True)`, seeded): unit-norm image embeddings x_i and
centroids c_j; each iteration assigns a(i) = argmax_j x_i·c_j and sets c_j = normalise(Σ_{a(i)=j} x_i).
FAISS trains on at most 256·k points (a seeded sample, as it would draw itself) and refills an empty
cluster by splitting a large one. After training every sample is assigned to its nearest centroid; for
unit vectors the largest inner product is the smallest Euclidean distance.

OUT holds:
  clusters.jsonl  one line per embedded sample, in source order: {"key", "cluster", "distance"}, with
                  distance = 1 − x_i·c_{a(i)} (cosine distance to its centroid, 0 … 2); with `--labels L`
                  > 1 also "labels": its L nearest clusters, nearest first (MLCD's multi-label targets)
  centroids.npy   float32 k×D, unit-norm
  cluster.json    k, sizes (samples per cluster), seed, niter, inertia = Σ_i ‖x_i − c_{a(i)}‖²
                  (= Σ 2·distance_i for unit vectors), the mean cosine to the centroid, and where the
                  embeddings came from; written last, so a folder without it is not a finished clustering
  embeddings/     the image embeddings, when `--embeddings` names no other folder (`lipkit embed`'s
                  format, resumable: a rerun continues after the last finished chunk)
Images that cannot be decoded get no embedding and no line (cluster.json counts them as unassigned).

Not implemented: choosing k (no elbow or silhouette search), other clusterers (hierarchical k-means as
in SemDeDup/MetaCLIP-style balancing), clustering text embeddings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import atomic_write, save_npy_atomic, write_json_atomic
from lipkit.data.records import Record
from lipkit.errors import UserError, import_optional
from lipkit.search.collection import checkpoint_fingerprint, collect, records_fingerprint
from lipkit.search.embeddings_dir import load_embeddings

OUR_FILES = ("clusters.jsonl", "centroids.npy", "cluster.json", "embeddings")
MAX_POINTS_PER_CENTROID = 256  # FAISS's own default: it would subsample to this many points per cluster
ASSIGN_BATCH = 65536


@dataclass
class Embedded:
    """A source's records and the unit-norm image embeddings of those that could be decoded."""

    records: list[Record]
    x: np.ndarray  # (n_embedded, D) float32, memory-mapped
    rows: list[int]  # rows[i]: the record embedding i belongs to
    path: Path


def _rows_of(records: Sequence[Record], items: Sequence[dict[str, Any]], where: Path) -> list[int]:
    """The record of each embedded item: ids.json lists a subsequence of the records, in order (images
    that could not be decoded are left out), so a walk matches them even when keys repeat."""

    def name(r: Record) -> str:  # ids.json of older embeddings has no key: its path is resolved
        return r.key if has_keys else str(Path(r.image).resolve())

    has_keys = all("key" in item for item in items)
    rows, j = [], 0
    for item in items:
        wanted = item["key"] if has_keys else item.get("path")
        while j < len(records) and name(records[j]) != wanted:
            j += 1
        if j == len(records):
            raise UserError(
                f"The embeddings in '{where}' are not those of this source's rows; pass the folder "
                "`lipkit embed CHECKPOINT SOURCE DIR` wrote for this SOURCE, or a new folder."
            )
        rows.append(j)
        j += 1
    return rows


def image_embeddings(
    checkpoint: str | Path,
    source: str | Path,
    emb_dir: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "captions",
    records: list[Record] | None = None,
    **embed_options: Any,
) -> Embedded:
    """SOURCE's image embeddings from `emb_dir`: a finished `lipkit embed` folder of this source and
    checkpoint is read as it is; anything else is (re)computed there with `run_embed`, which resumes an
    interrupted job and refuses a folder of other embeddings. `records`: SOURCE's, when already read."""
    emb_dir = Path(emb_dir).expanduser()
    if records is None:
        records = collect(source, image_column, caption_column)
    manifest_path = emb_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    if manifest.get("complete"):
        fp = manifest.get("fingerprint", {})
        if fp.get("items") != records_fingerprint(records) or fp.get("checkpoint") != checkpoint_fingerprint(
            checkpoint
        ):
            raise UserError(
                f"'{emb_dir}' holds embeddings of another source or checkpoint; pass the folder "
                f"`lipkit embed {checkpoint} {source} DIR` wrote, or a new folder."
            )
        if "onnx" in fp:  # int8 image vectors beside the checkpoint's own text vectors would not compare
            raise UserError(
                f"The embeddings in '{emb_dir}' come from the int8 ONNX towers (`lipkit embed --int8`); embed "
                "without --int8, or pass a new folder."
            )
    else:
        from lipkit.search.embed import run_embed

        run_embed(
            checkpoint,
            source,
            emb_dir,
            image_column=image_column,
            caption_column=caption_column,
            tokens=False,  # curation reads the pooled embeddings only
            **embed_options,
        )
    emb = load_embeddings(emb_dir)
    x = emb.image()
    if x.shape[0] == 0:
        raise UserError(
            f"None of the images of '{source}' could be decoded (see {emb_dir / 'skipped.json'})."
        )
    return Embedded(records, x, _rows_of(records, emb.items, emb_dir), emb_dir)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """The k unit-norm centroids of FAISS's spherical k-means over the rows of `x` (normalised here),
    trained on a seeded sample of at most 256·k rows."""
    faiss = import_optional(
        "faiss", lambda e: f"Clustering needs FAISS ({e}); run `pip install 'lipkit[search]'`."
    )

    n, d = x.shape
    if not 1 <= k <= n:
        raise UserError(f"--k must be between 1 and the number of embedded images ({n}), got {k}.")
    rows = np.arange(n)
    if n > MAX_POINTS_PER_CENTROID * k:
        rows = np.sort(np.random.default_rng(seed).choice(n, MAX_POINTS_PER_CENTROID * k, replace=False))
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,  # few points per cluster is the user's choice, not a warning
        max_points_per_centroid=MAX_POINTS_PER_CENTROID,
    )
    km.train(_unit(x[rows]))
    return _unit(km.centroids)


def assign(x: np.ndarray, centroids: np.ndarray, nearest: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine distance 1 − x·c) of each row of `x` (normalised here): its nearest centroid; with
    `nearest` > 1 the clusters are (n, nearest), nearest first."""
    faiss = import_optional(
        "faiss", lambda e: f"Clustering needs FAISS ({e}); run `pip install 'lipkit[search]'`."
    )

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels, dists = np.empty((len(x), nearest), np.int64), np.empty(len(x), np.float64)
    for s in range(0, len(x), ASSIGN_BATCH):
        sim, ids = index.search(_unit(x[s : s + ASSIGN_BATCH]), nearest)
        labels[s : s + len(ids)] = ids
        dists[s : s + len(ids)] = 1.0 - sim[:, 0].astype(np.float64)
    return (labels[:, 0] if nearest == 1 else labels), np.clip(dists, 0.0, 2.0)


def check_out_dir(out: Path, ours: Sequence[str] = OUR_FILES, inputs: Sequence[str | Path] = ()) -> None:
    """OUT is a new folder, or one this command wrote before (a rerun replaces its results), and holds
    none of the inputs."""
    from lipkit.curate.pairs_out import source_inside

    if any(source_inside(s, out) for s in inputs):
        raise UserError(f"Output '{out}' is or holds an input of this command; choose a new OUT folder.")
    if out.exists() and not out.is_dir():
        raise UserError(f"Output '{out}' is a file; pass a folder path for the results.")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
        if foreign:
            raise UserError(
                f"Output '{out}' holds files this command did not write ({', '.join(foreign[:3])}); choose a "
                "new or empty OUT folder."
            )


def check_unique_keys(records: Sequence[Record], source: str | Path) -> None:
    """clusters.jsonl names samples by key: refuse two different images under one key (WebDataset shards
    whose __key__ restarts in every shard; the same image listed twice may share its key)."""
    seen: dict[str, Path] = {}
    for r in records:
        first = seen.setdefault(r.key, r.image)
        if first != r.image:
            raise UserError(
                f"Two samples of '{source}' share the key '{r.key}' ({first} and {r.image}), so clusters could "
                "not tell them apart; give every row a unique `key` column (or unique __key__ in shards)."
            )


def write_clusters(out: Path, keys: Sequence[str], labels: np.ndarray, dists: np.ndarray) -> None:
    """One line per sample; `labels` (n,) or (n, L): with L nearest clusters each line lists them too."""

    def write(f: Any) -> None:
        for key, c, d in zip(keys, labels.tolist(), dists.tolist(), strict=True):
            row = {"key": key, "cluster": c[0] if isinstance(c, list) else c, "distance": round(d, 6)}
            if isinstance(c, list):
                row["labels"] = c
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(out / "clusters.jsonl", write, text=True)


def run_cluster(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    k: int,
    *,
    embeddings: str | Path | None = None,
    seed: int = 0,
    niter: int = 20,
    labels_per_sample: int = 1,
    **embed_options: Any,
) -> dict[str, Any]:
    """`lipkit data cluster`: embed (or read) SOURCE's images, spherical k-means, write OUT (module doc);
    the summary written to cluster.json."""
    out = Path(out).expanduser()
    check_out_dir(out, OUR_FILES, [source])
    if k < 1 or niter < 1:
        raise UserError(f"--k and --niter must be at least 1, got {k} and {niter}.")
    records = collect(
        source, embed_options.get("image_column", "image"), embed_options.get("caption_column", "captions")
    )
    if k > len(records):
        raise UserError(f"--k must be between 1 and the number of images ({len(records)}), got {k}.")
    if not 1 <= labels_per_sample <= k:
        raise UserError(f"--labels must be between 1 and --k ({k}), got {labels_per_sample}.")
    check_unique_keys(records, source)  # before the costly embedding
    out.mkdir(parents=True, exist_ok=True)
    emb = image_embeddings(
        checkpoint, source, embeddings or out / "embeddings", records=records, **embed_options
    )
    from lipkit.curate.pairs_out import source_name

    centroids = spherical_kmeans(emb.x, k, seed, niter)
    nearest, dists = assign(emb.x, centroids, labels_per_sample)
    labels = nearest if labels_per_sample == 1 else nearest[:, 0]
    keys = [emb.records[r].key for r in emb.rows]
    (out / "cluster.json").unlink(missing_ok=True)  # not finished until it is written again
    write_clusters(out, keys, nearest, dists)
    save_npy_atomic(out / "centroids.npy", centroids.astype(np.float32))
    summary = {
        "format": "lipkit-clusters",
        "k": k,
        "labels_per_sample": labels_per_sample,
        "sizes": np.bincount(labels, minlength=k).tolist(),
        "seed": seed,
        "niter": niter,
        "inertia": float(2.0 * dists.sum()),
        "mean_cosine": float(1.0 - dists.mean()),
        "n_assigned": len(keys),
        "n_unassigned": len(emb.records) - len(keys),
        "distance": "1 - cosine similarity to the centroid",
        "source": source_name(source),
        "checkpoint": str(checkpoint),
        "embeddings": str(emb.path.resolve()),
    }
    write_json_atomic(out / "cluster.json", summary)
    return summary


def load_clusters(path: str | Path) -> dict[str, tuple[int, float]]:
    """key → (cluster, distance) from a folder `lipkit data cluster` wrote (the last line wins for a key
    that repeats: the same image listed twice has one embedding)."""
    p = Path(path).expanduser()
    if not (p / "cluster.json").is_file() or not (p / "clusters.jsonl").is_file():
        raise UserError(
            f"'{p}' is not a finished clustering (no cluster.json); make it with "
            f"`lipkit data cluster CHECKPOINT SOURCE {p} --k N`."
        )
    out: dict[str, tuple[int, float]] = {}
    with (p / "clusters.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["key"]] = (int(row["cluster"]), float(row["distance"]))
    return out


def lookup(
    records: Sequence[Record], clusters: dict[str, tuple[int, float]]
) -> list[tuple[int, float] | None]:
    """Each record's (cluster, distance): by key, else by the absolute image path (a table read through
    another spelling of its path names the same files); None for a record the clustering did not see."""
    found: list[tuple[int, float] | None] = [clusters.get(r.key) for r in records]
    if all(f is not None for f in found):
        return found
    by_path = {os.path.abspath(k): v for k, v in clusters.items()}
    return [
        f if f is not None else by_path.get(os.path.abspath(r.key)) or by_path.get(os.path.abspath(r.image))
        for f, r in zip(found, records, strict=True)
    ]
