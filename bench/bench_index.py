"""Index benchmark: recall@10 of each approximate index against exact search, query latency
(p50/p99, one query at a time, one thread — the way the server runs them), build time and memory.

Workloads
  emoji     the built-in dataset embedded with a checkpoint; queries are caption embeddings
            (text→image) searched over the image embeddings
  random    N random unit vectors (default 1,000,000 × 256) with random unit queries: the hard case,
            near-uniform distances and no cluster structure
  sparse    the sparse inverted index against an exact dense matmul: on the emoji captions as bags of
            tokenizer ids (a real vocabulary distribution) and on random LexLIP-like weights

  python bench/bench_index.py --checkpoint /tmp/run2/checkpoint --n 1000000 --out bench/results/index.jsonl
  python bench/bench_index.py --skip-emoji --n 200000          # smaller, faster

Every row is printed and written as one JSON line to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import faiss  # noqa: E402

from lipkit.search.index import build_index, exact_topk, neighbour_overlap  # noqa: E402
from lipkit.search.sparse_index import SparseIndex  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit_vectors(n: int, d: int, seed: int, block: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latencies(search, queries: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """p50, p99 in ms of one-query searches; and the ids found."""
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = search(q[None], k)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    t = 1000 * np.asarray(times)
    return float(np.percentile(t, 50)), float(np.percentile(t, 99)), np.stack(found)


def emit(row: dict, out) -> None:
    print(
        f"{row['workload']:>14} {row['index']:>26}  recall@10 {row.get('recall@10', float('nan')):.3f}  "
        f"p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  build {row.get('build_s', 0):.1f} s  "
        f"index {row.get('index_mb', 0):.1f} MB  rss+ {row.get('rss_delta_mb', 0):.0f} MB",
        flush=True,
    )
    if out:
        out.write(json.dumps(row) + "\n")
        out.flush()


def dense_suite(
    workload: str,
    base: np.ndarray,
    queries: np.ndarray,
    configs: list[tuple[str, dict]],
    k: int,
    out,
    threads: int,
) -> None:
    t0 = time.perf_counter()
    truth = exact_topk(base, queries, k)
    print(
        f"{workload}: {base.shape[0]:,}×{base.shape[1]} base, {len(queries)} queries; exact top-{k} in {time.perf_counter() - t0:.1f} s"
    )
    for kind, params in configs:
        gc.collect()
        before = rss_mb()
        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        ix = build_index(base, kind, **params)
        build_s = time.perf_counter() - t0
        delta = rss_mb() - before
        faiss.omp_set_num_threads(1)
        sweep = {
            "hnsw": [("ef", v) for v in (64, 128, 256)],
            "ivfpq": [("nprobe", v) for v in (8, 32, 128)],
        }.get(kind, [(None, None)])
        for name, value in sweep:
            extra = {name: value} if name else {}
            p50, p99, found = latencies(partial(ix.search, **extra), queries, k)
            label = kind + "".join(f" {a}={b}" for a, b in {**ix.info["params"], **extra}.items())
            emit(
                {
                    "workload": workload,
                    "index": label,
                    "n": int(base.shape[0]),
                    "dim": int(base.shape[1]),
                    "recall@10": neighbour_overlap(found, truth),
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "build_s": build_s,
                    "index_mb": ix.memory_bytes() / 2**20,
                    "rss_delta_mb": delta,
                    "raw_vectors_mb": base.nbytes / 2**20,
                },
                out,
            )
        ix = None  # free it before the next build


def tie_aware_recall(found: np.ndarray, scores_exact: np.ndarray, k: int) -> float:
    """Share of the exact top-k found, where a found id counts when its exact score reaches the k-th
    best exact score (tied documents are equally right) and documents scoring 0 (sharing no term with
    the query) are not expected: a query matching only 3 documents needs only those 3."""
    hits = needed = 0
    for r in range(len(found)):
        want = min(k, int((scores_exact[r] > 0).sum()))
        if want == 0:
            continue
        kth = np.sort(scores_exact[r])[-want]
        ids = found[r][found[r] >= 0]
        hits += min(want, int((scores_exact[r, ids] >= kth - 1e-5 * max(1.0, kth)).sum()))
        needed += want
    return hits / max(1, needed)


def sparse_suite(
    workload: str, docs: SparseIndex, dense_docs: np.ndarray, queries: np.ndarray, k: int, out
) -> None:
    p50, p99, found = latencies(docs.search, queries, k)
    exact = queries @ dense_docs.T
    t_dense = []
    for q in queries[: min(200, len(queries))]:
        t0 = time.perf_counter()
        s = dense_docs @ q
        np.argpartition(-s, k)[:k]
        t_dense.append(time.perf_counter() - t0)
    td = 1000 * np.asarray(t_dense)
    common = {"workload": workload, "n": docs.ntotal, "dim": docs.dim, "nnz_per_doc": docs.nnz / docs.ntotal}
    emit(
        {
            **common,
            "index": "sparse inverted",
            "recall@10": tie_aware_recall(found, exact, k),
            "p50_ms": p50,
            "p99_ms": p99,
            "index_mb": docs.memory_bytes() / 2**20,
        },
        out,
    )
    emit(
        {
            **common,
            "index": "dense exact matmul",
            "recall@10": 1.0,
            "p50_ms": float(np.percentile(td, 50)),
            "p99_ms": float(np.percentile(td, 99)),
            "index_mb": dense_docs.nbytes / 2**20,
        },
        out,
    )


def emoji(args, out) -> None:
    from lipkit.checkpoint import load_checkpoint
    from lipkit.search.collection import collect
    from lipkit.search.embed import embed_collection
    from lipkit.search.embeddings_dir import load_embeddings

    root = Path(args.emoji).expanduser()
    work = Path(args.work).expanduser()
    model, tok, _ = load_checkpoint(args.checkpoint)
    records = [r for split in ("train", "test-style", "test-novel") for r in collect(root / f"{split}.jsonl")]
    t0 = time.perf_counter()
    res = embed_collection(model, tok, records, work / "emoji-emb", batch_size=256, progress=True)
    print(
        f"emoji: embedded {res.n_embedded} images + captions ({res.chunks_computed} chunks computed) in {time.perf_counter() - t0:.0f} s"
    )
    emb = load_embeddings(work / "emoji-emb")
    base = np.ascontiguousarray(emb.image())
    queries = np.load(work / "emoji-emb" / "text_emb.npy")
    pick = np.random.default_rng(0).choice(len(queries), size=min(1000, len(queries)), replace=False)
    if not args.skip_emoji_dense:
        dense_suite(
            "emoji text→img",
            base,
            queries[pick],
            [("flat", {}), ("hnsw", {}), ("ivfpq", {}), ("ivfpq", {"m": base.shape[1] // 2})],
            10,
            out,
            args.build_threads,
        )
    # sparse: every item's captions as a bag of tokenizer ids; queries: one caption's bag
    specials = {tok.pad_id, tok.sot_id, tok.eot_id}
    v = tok.vocab_size
    rows, cols = [], []
    for i, r in enumerate(records):
        for ids in tok(r.captions).tolist():
            for t in ids:
                if t not in specials:
                    rows.append(i)
                    cols.append(t)
    dense_docs = np.zeros((len(records), v), np.float32)
    np.add.at(dense_docs, (np.asarray(rows), np.asarray(cols)), 1.0)
    dense_docs = np.log1p(dense_docs)  # saturating term frequency, LexLIP-like non-negative weights
    ix = SparseIndex.build(dense_docs)
    q = np.zeros((len(pick), v), np.float32)
    for j, i in enumerate(pick):
        for t in tok([records[i].captions[0]])[0].tolist():
            if t not in specials:
                q[j, t] = 1.0
    sparse_suite("emoji bag-of-tokens", ix, dense_docs, q, 10, out)


def random_sparse(args, out) -> None:
    rng = np.random.default_rng(0)
    n, v, per_doc, per_q = args.sparse_n, args.sparse_vocab, 64, 8
    # Zipf-like term popularity: a few frequent terms, a long tail (as in real vocabularies)
    pop = 1.0 / np.arange(1, v + 1) ** 0.8
    pop /= pop.sum()
    dense_docs = np.zeros((n, v), np.float32)
    for i in range(n):
        t = rng.choice(v, size=per_doc, replace=False, p=pop)
        dense_docs[i, t] = rng.random(per_doc, dtype=np.float32)
    ix = SparseIndex.build(dense_docs)
    queries = np.zeros((args.queries, v), np.float32)
    for j in range(args.queries):
        t = rng.choice(v, size=per_q, replace=False, p=pop)
        queries[j, t] = rng.random(per_q, dtype=np.float32)
    sparse_suite(f"random sparse V={v}", ix, dense_docs, queries, 10, out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="/tmp/run2/checkpoint", help="checkpoint for the emoji workload")
    ap.add_argument("--emoji", default="~/.cache/lipkit/datasets/emoji", help="built emoji dataset folder")
    ap.add_argument("--work", default="/tmp/lipkit-bench-index", help="cache for the emoji embeddings")
    ap.add_argument("--n", type=int, default=1_000_000, help="random workload size (0 skips it)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--hnsw-efc", type=int, default=200, help="HNSW efConstruction (build breadth)")
    ap.add_argument("--build-threads", type=int, default=faiss.omp_get_max_threads())
    ap.add_argument("--sparse-n", type=int, default=50_000)
    ap.add_argument("--sparse-vocab", type=int, default=8192)
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq", help="index kinds for the random workload")
    ap.add_argument("--skip-emoji", action="store_true")
    ap.add_argument("--skip-emoji-dense", action="store_true", help="emoji: only the sparse comparison")
    ap.add_argument("--skip-sparse", action="store_true")
    ap.add_argument("--out", default="", help="JSONL file for the rows")
    args = ap.parse_args()
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    if not args.skip_emoji:
        emoji(args, out)
    if not args.skip_sparse:
        random_sparse(args, out)
    if args.n:
        t0 = time.perf_counter()
        base = unit_vectors(args.n, args.dim, 0)
        queries = unit_vectors(args.queries, args.dim, 1)
        print(f"random: generated {args.n:,}×{args.dim} in {time.perf_counter() - t0:.1f} s")
        dense_suite(
            f"random {args.n // 1000}k×{args.dim}",
            base,
            queries,
            [
                (kind, params)
                for kind, params in [
                    ("flat", {}),
                    ("hnsw", {"m": args.hnsw_m, "ef_construction": args.hnsw_efc}),
                    ("ivfpq", {}),
                    ("ivfpq", {"m": args.dim // 2}),
                ]
                if kind in args.kinds.split(",")
            ],
            10,
            out,
            args.build_threads,
        )
    if out:
        out.close()
