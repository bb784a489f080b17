"""Dense (FAISS, inner product) and sparse (inverted lists over vocabulary weights) indexes.

An index is a directory:
  index.json    kind, dimension, count, build/search parameters, where its vectors came from
  items.json    one entry per vector, in id order: {"id", "path", "caption", "meta"} (what a hit shows)
  index.faiss   the FAISS index (dense kinds: flat, hnsw, ivfpq)
  postings.npz  the inverted lists (sparse kind): CSC arrays indptr/indices/data plus shape
  tokens.npy    every item's image token features (tokens kind: FILIP's late interaction, search.token_index)

Ids are positions: the i-th vector added has id i, across builds and `add`s. Dense vectors are
L2-normalised CLIP embeddings, so inner product is cosine similarity. Sparse vectors are non-negative
N×V vocabulary weights (a LexLIP-style lexicon head, or any bag of words); a query is a V-vector and a
document's score is the sparse dot product, summed over the query's non-zero terms' posting lists.
Saving goes through a temporary sibling directory and a rename, like checkpoints: a crash leaves the
old index or the new one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.search.index_format import FORMAT, as_queries, base_info, renumber, write_meta
from lipkit.search.sparse_index import SparseIndex
from lipkit.search.token_index import TokenIndex

DENSE_KINDS = ("flat", "hnsw", "ivfpq")
KINDS = (*DENSE_KINDS, "sparse", "tokens")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise UserError(
            "Dense indexes need FAISS, which is not installed; run `pip install 'lipkit[search]'` "
            "(or `pip install faiss-cpu`)."
        ) from e
    return faiss


# ----------------------------------------------------------------------------------------------
# dense


def _divisor_at_most(d: int, target: int) -> int:
    return max(m for m in range(1, max(1, target) + 1) if d % m == 0)


def default_dense_params(kind: str, n: int, dim: int, **given: Any) -> dict[str, Any]:
    """Fill unset build/search parameters with sizes that fit n vectors of dimension dim."""
    p = {k: v for k, v in given.items() if v is not None}
    if kind == "hnsw":
        p.setdefault("m", 32)
        p.setdefault("ef_construction", 200)
        p.setdefault("ef", 128)
    elif kind == "ivfpq":
        # about √n lists (a power of two), each with >= 39 training points (FAISS's own rule)
        nlist = 2 ** round(math.log2(max(1.0, math.sqrt(max(n, 1)))))
        p.setdefault("nlist", int(max(1, min(nlist, n // 39 or 1))))
        p.setdefault("m", _divisor_at_most(dim, dim // 4))  # 4 dimensions per sub-quantizer
        p.setdefault("nbits", 8)
        p.setdefault("nprobe", max(1, min(p["nlist"], max(8, p["nlist"] // 8))))
        if dim % p["m"]:
            raise UserError(
                f"--m {p['m']} does not divide the vector dimension {dim}; IVF-PQ needs one that does "
                f"(e.g. --m {_divisor_at_most(dim, dim // 4)})."
            )
    return p


class DenseIndex:
    """A FAISS index with inner-product metric; ids are insertion positions."""

    def __init__(self, index: Any, kind: str, info: dict[str, Any], items: list[dict[str, Any]]) -> None:
        self.index, self.kind, self.info, self.items = index, kind, info, items
        self.dim = int(index.d)
        self._apply_defaults()

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: str = "flat",
        items: Sequence[dict[str, Any]] | None = None,
        **params: Any,
    ) -> DenseIndex:
        faiss = _faiss()
        if kind not in DENSE_KINDS:
            raise UserError(f"Unknown dense index kind '{kind}'; choose one of {', '.join(DENSE_KINDS)}.")
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] == 0:
            raise UserError(f"Need a non-empty N×D matrix of vectors to index, got shape {x.shape}.")
        if not np.isfinite(x).all():
            raise UserError("The vectors contain NaN or infinite values; re-embed the collection.")
        n, d = x.shape
        p = default_dense_params(kind, n, d, **params)
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(p["m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["ef_construction"])
        else:
            need = max(int(p["nlist"]), 2 ** int(p["nbits"]))
            if n < need:
                raise UserError(
                    f"IVF-PQ with nlist={p['nlist']} and nbits={p['nbits']} needs at least {need} vectors "
                    f"to train, but there are {n}; use --kind flat or hnsw for a collection this small."
                )
            index = faiss.index_factory(
                d, f"IVF{int(p['nlist'])},PQ{int(p['m'])}x{int(p['nbits'])}", faiss.METRIC_INNER_PRODUCT
            )
            index.cp.seed = 1234  # deterministic training (coarse k-means and PQ codebooks)
            index.pq.cp.seed = 1234
            index.do_polysemous_training = False  # costs minutes and only helps Hamming-filtered search
            index.cp.max_points_per_centroid = 128  # coarse k-means on a sample: enough, and bounded
            index.train(x)
        index.add(x)
        out = cls(index, kind, base_info(kind, d, p), renumber(items, n, 0))
        return out

    def _apply_defaults(self) -> None:
        p = self.info["params"]
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(p["ef"])
        elif self.kind == "ivfpq":
            self.index.nprobe = int(p["nprobe"])

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, ef: int | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each Q×k, best first; ids are -1 where fewer than k exist."""
        faiss = _faiss()
        q = as_queries(queries, self.dim, "The query")
        params = None
        if self.kind == "hnsw" and ef is not None:
            params = faiss.SearchParametersHNSW(efSearch=max(int(ef), k))
        elif self.kind == "ivfpq" and nprobe is not None:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        elif self.kind == "hnsw" and k > self.index.hnsw.efSearch:
            params = faiss.SearchParametersHNSW(efSearch=k)  # ef below k cannot return k hits
        scores, ids = self.index.search(q, k, params=params)
        return scores, ids

    def add(self, vectors: Any, items: Sequence[dict[str, Any]] | None = None) -> None:
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(
                f"Cannot add vectors of shape {x.shape} to an index of {self.dim}-d vectors; embed them "
                "with the checkpoint that built the index."
            )
        if not np.isfinite(x).all():
            raise UserError("The vectors to add contain NaN or infinite values; re-embed them.")
        new = renumber(items, x.shape[0], self.ntotal)
        self.index.add(x)
        self.items.extend(new)

    def memory_bytes(self) -> int:
        """Bytes of the serialised index (≈ its resident size: codes, graph links, centroids)."""
        return int(_faiss().serialize_index(self.index).nbytes)

    def save(self, path: str | Path) -> Path:
        faiss = _faiss()
        self.info.update(count=self.ntotal, dim=self.dim, kind=self.kind)

        def write(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            write_meta(tmp, self.info, self.items)

        return write_dir(Path(path), write)


# ----------------------------------------------------------------------------------------------
# load / build


def load_index(path: str | Path) -> DenseIndex | SparseIndex | TokenIndex:
    p = Path(path).expanduser()
    meta = p / "index.json"
    if not meta.is_file():
        raise UserError(
            f"'{p}' is not a lipkit index (it has no index.json); build one with `lipkit index build EMB_DIR {p}`."
        )
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        items = json.loads((p / "items.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"Index '{p}' is damaged ({e}); rebuild it with `lipkit index build`.") from e
    if info.get("format") != FORMAT:
        raise UserError(f"'{meta}' is not a lipkit index description; rebuild it with `lipkit index build`.")
    kind = info.get("kind")
    index: DenseIndex | SparseIndex | TokenIndex
    if kind == "tokens":
        index = TokenIndex.load(p, info, items)
    elif kind == "sparse":
        with np.load(p / "postings.npz", allow_pickle=False) as z:
            n_docs = int(z["shape"][0])
            index = SparseIndex(z["indptr"], z["indices"], z["data"], n_docs, info, items)
    elif kind in DENSE_KINDS:
        faiss = _faiss()
        try:
            fx = faiss.read_index(str(p / "index.faiss"))
        except RuntimeError as e:
            raise UserError(f"Index file '{p / 'index.faiss'}' cannot be read; rebuild the index.") from e
        index = DenseIndex(fx, kind, info, items)
    else:
        raise UserError(f"Index '{p}' has unknown kind '{kind}'; rebuild it with `lipkit index build`.")
    if len(items) != index.ntotal:
        raise UserError(
            f"Index '{p}' holds {index.ntotal} vectors but {len(items)} items; rebuild it with `lipkit index build`."
        )
    return index


def build_index(
    vectors: Any,
    kind: str,
    items: Sequence[dict[str, Any]] | None = None,
    **params: Any,
) -> DenseIndex | SparseIndex | TokenIndex:
    if kind == "sparse":
        return SparseIndex.build(vectors, items)
    if kind == "tokens":
        return TokenIndex.build(vectors, items)
    if kind not in DENSE_KINDS:
        raise UserError(f"Unknown index kind '{kind}'; choose one of {', '.join(KINDS)}.")
    return DenseIndex.build(vectors, kind, items, **params)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference top-k ids by brute-force inner product (NumPy), for `neighbour_overlap`."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        sims = queries[s : s + 256] @ base.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        ids[s : s + 256] = np.take_along_axis(part, order, 1)
    return ids


def neighbour_overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """How much an approximate index agrees with exact search: mean |found ∩ truth| / k over queries
    (both Q×k id arrays, `truth` from `exact_topk`; -1 never matches). Not retrieval recall (that is
    `lipkit.eval.retrieval.recall_at_k`, hits of the relevant item)."""
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))
