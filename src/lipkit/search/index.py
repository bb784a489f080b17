"""Dense (FAISS, inner product) and sparse (inverted lists over vocabulary weights) indexes.

An index is a directory:
  index.json    kind, dimension, count, build/search parameters, where its vectors came from
  items.json    one entry per vector, in id order: {"id", "path", "caption", "meta"} (what a hit shows)
  index.faiss   the FAISS index (dense kinds: flat, hnsw, ivfpq)
  postings.npz  the inverted lists (sparse kind): CSC arrays indptr/indices/data plus shape

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
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lipkit import __version__
from lipkit.errors import UserError

DENSE_KINDS = ("flat", "hnsw", "ivfpq")
KINDS = (*DENSE_KINDS, "sparse")
FORMAT = "lipkit-index"


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
# common


def _as_queries(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    q = np.asarray(x, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise UserError(f"{what} has shape {tuple(np.shape(x))}, but this index holds {dim}-d vectors.")
    return np.ascontiguousarray(q)


def _write_dir_atomically(dest: Path, write: Any) -> Path:
    """Call write(tmp_dir), then swap tmp_dir into `dest` (replacing an older directory)."""
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def default_items(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": start + i, "path": None, "caption": None, "meta": {}} for i in range(n)]


class Index(Protocol):
    kind: str
    dim: int
    items: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]: ...

    def add(self, vectors: Any, items: Sequence[dict[str, Any]] | None = None) -> None: ...

    def save(self, path: str | Path) -> Path: ...

    def memory_bytes(self) -> int: ...


def _renumber(items: Sequence[dict[str, Any]] | None, n: int, start: int) -> list[dict[str, Any]]:
    if items is None:
        return default_items(n, start)
    if len(items) != n:
        raise UserError(f"Got {n} vectors but {len(items)} item entries; they must match one to one.")
    return [{**it, "id": start + i} for i, it in enumerate(items)]


def _base_info(kind: str, dim: int, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": 1,
        "lipkit_version": __version__,
        "kind": kind,
        "dim": dim,
        "metric": "inner_product",
        "params": params,
        "sources": [],
    }


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
        out = cls(index, kind, _base_info(kind, d, p), _renumber(items, n, 0))
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
        q = _as_queries(queries, self.dim, "The query")
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
        new = _renumber(items, x.shape[0], self.ntotal)
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
            _write_meta(tmp, self.info, self.items)

        return _write_dir_atomically(Path(path), write)


# ----------------------------------------------------------------------------------------------
# sparse


class SparseIndex:
    """Inverted lists over V vocabulary terms, stored column-major (CSC): for term v, documents
    indices[indptr[v]:indptr[v+1]] with weights data[...]. Scores are exact sparse dot products."""

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        n_docs: int,
        info: dict[str, Any] | None = None,
        items: list[dict[str, Any]] | None = None,
    ) -> None:
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.data = np.asarray(data, dtype=np.float32)
        self.n_docs = int(n_docs)
        self.dim = len(self.indptr) - 1
        self.kind = "sparse"
        self.info = info or _base_info("sparse", self.dim, {})
        self.items = items if items is not None else default_items(self.n_docs)

    # -- construction
    @staticmethod
    def _coo(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """(rows, cols, values, shape) of the non-zeros of a dense array or a SparseMatrix triple."""
        if isinstance(matrix, SparseMatrix):
            return matrix.rows, matrix.cols, matrix.vals, matrix.shape
        m = np.asarray(matrix)
        if m.ndim != 2:
            raise UserError(f"Lexical weights must be an N×V matrix, got shape {m.shape}.")
        rows, cols = np.nonzero(m)
        return rows, cols, m[rows, cols], (m.shape[0], m.shape[1])

    @staticmethod
    def _check(vals: np.ndarray, what: str) -> None:
        if vals.size and not np.isfinite(vals).all():
            raise UserError(f"{what} contain NaN or infinite values; recompute them.")
        if vals.size and vals.min() < 0:
            raise UserError(
                f"{what} must be non-negative (found {float(vals.min()):.4g}); a lexicon head should end in "
                "ReLU/log1p, or clip the matrix at 0."
            )

    @classmethod
    def build(cls, matrix: Any, items: Sequence[dict[str, Any]] | None = None) -> SparseIndex:
        rows, cols, vals, (n, v) = cls._coo(matrix)
        cls._check(vals, "Lexical weights")
        if n == 0:
            raise UserError("Need at least one row of lexical weights to index.")
        indptr, indices, data = _csc(rows, cols, vals, v)
        out = cls(indptr, indices, data, n, _base_info("sparse", v, {}), _renumber(items, n, 0))
        return out

    @property
    def ntotal(self) -> int:
        return self.n_docs

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    def add(self, matrix: Any, items: Sequence[dict[str, Any]] | None = None) -> None:
        rows, cols, vals, (n, v) = self._coo(matrix)
        if v != self.dim:
            raise UserError(
                f"Cannot add {v}-term lexical vectors to an index over {self.dim} terms; use the same vocabulary."
            )
        self._check(vals, "Lexical weights")
        new = _renumber(items, n, self.n_docs)
        old_cols = np.repeat(np.arange(self.dim), np.diff(self.indptr))
        self.indptr, self.indices, self.data = _csc(
            np.concatenate([self.indices, rows + self.n_docs]),
            np.concatenate([old_cols, cols]),
            np.concatenate([self.data, vals.astype(np.float32)]),
            self.dim,
        )
        self.n_docs += n
        self.items.extend(new)

    # -- query
    def scores(self, query: np.ndarray) -> np.ndarray:
        """Dot products of one V-vector query with every document (float64, length N)."""
        q = np.asarray(query, dtype=np.float64).ravel()
        if q.size != self.dim:
            raise UserError(f"The query has {q.size} terms, but this index is over {self.dim}.")
        terms = np.flatnonzero(q)
        starts, ends = self.indptr[terms], self.indptr[terms + 1]
        lens = ends - starts
        total = int(lens.sum())
        if total == 0:
            return np.zeros(self.n_docs)
        # positions of every posting of every query term, in one vector
        first = np.cumsum(lens) - lens
        pos = np.repeat(starts - first, lens) + np.arange(total)
        weights = self.data[pos] * np.repeat(q[terms], lens)
        return np.bincount(self.indices[pos], weights=weights, minlength=self.n_docs)

    def search(self, queries: np.ndarray, k: int, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) by sparse dot product; only documents sharing a term with the query are
        returned (ids are -1 after them). Ties go to the lower id."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        self._check(q[q != 0], "Query weights")
        out_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
        for r in range(q.shape[0]):
            s = self.scores(q[r])
            hits = np.flatnonzero(s > 0)
            if hits.size > k:
                hits = hits[np.argpartition(-s[hits], k - 1)[:k]]
            hits = hits[np.lexsort((hits, -s[hits]))]
            out_s[r, : hits.size], out_i[r, : hits.size] = s[hits], hits
        return out_s, out_i

    def memory_bytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def save(self, path: str | Path) -> Path:
        self.info.update(count=self.ntotal, dim=self.dim, kind="sparse", nnz=self.nnz)

        def write(tmp: Path) -> None:
            small = self.n_docs < 2**31
            np.savez(
                tmp / "postings.npz",
                indptr=self.indptr,
                indices=self.indices.astype(np.int32 if small else np.int64),
                data=self.data,
                shape=np.array([self.n_docs, self.dim], dtype=np.int64),
            )
            _write_meta(tmp, self.info, self.items)

        return _write_dir_atomically(Path(path), write)


class SparseMatrix:
    """A minimal COO triple (no SciPy needed): rows, cols, vals and the (N, V) shape."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.cols = np.asarray(cols, dtype=np.int64)
        self.vals = np.asarray(vals, dtype=np.float32)
        self.shape = (int(shape[0]), int(shape[1]))
        keep = self.vals != 0
        if not keep.all():
            self.rows, self.cols, self.vals = self.rows[keep], self.cols[keep], self.vals[keep]

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float32)
        np.add.at(out, (self.rows, self.cols), self.vals)
        return out


def _csc(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_terms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((rows, cols))  # by term, then by document
    counts = np.bincount(cols, minlength=n_terms) if cols.size else np.zeros(n_terms, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, np.asarray(rows, dtype=np.int64)[order], np.asarray(vals, dtype=np.float32)[order]


def read_lexical(path: str | Path) -> np.ndarray | SparseMatrix:
    """Read N×V non-negative weights: a dense .npy, an .npz holding one dense array, or an .npz in
    SciPy's `save_npz` layout (csr/csc/coo) — read without SciPy."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(
            f"Lexical weights '{p}' do not exist; write an N×V matrix there as lex.npy or lex.npz."
        )
    try:
        if p.suffix == ".npy":
            return np.load(p, mmap_mode="r", allow_pickle=False)
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if "format" in keys and "shape" in keys:
                fmt = z["format"].item()
                fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
                shape = tuple(int(s) for s in z["shape"])
                if fmt in ("csr", "csc"):
                    indptr, indices, data = z["indptr"], z["indices"], z["data"]
                    major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
                    rows, cols = (major, indices) if fmt == "csr" else (indices, major)
                    return SparseMatrix(rows, cols, data, (shape[0], shape[1]))
                if fmt == "coo":
                    return SparseMatrix(z["row"], z["col"], z["data"], (shape[0], shape[1]))
                raise UserError(f"'{p}' holds a sparse '{fmt}' matrix; save it as csr, csc or coo.")
            arrays = [z[k] for k in z.files]
    except (ValueError, OSError) as e:
        raise UserError(f"'{p}' is not a readable NumPy file ({e}); write it with numpy.save/savez.") from e
    if len(arrays) != 1:
        raise UserError(
            f"'{p}' holds {len(arrays)} arrays; save exactly one N×V matrix (or a SciPy sparse one)."
        )
    return arrays[0]


# ----------------------------------------------------------------------------------------------
# load / save helpers


def _write_meta(tmp: Path, info: dict[str, Any], items: list[dict[str, Any]]) -> None:
    (tmp / "index.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    with (tmp / "items.json").open("w", encoding="utf-8") as f:
        json.dump(items, f, ensure_ascii=False, separators=(",", ":"))


def load_index(path: str | Path) -> DenseIndex | SparseIndex:
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
    if kind == "sparse":
        with np.load(p / "postings.npz", allow_pickle=False) as z:
            n_docs = int(z["shape"][0])
            index: DenseIndex | SparseIndex = SparseIndex(
                z["indptr"], z["indices"], z["data"], n_docs, info, items
            )
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
) -> DenseIndex | SparseIndex:
    if kind == "sparse":
        return SparseIndex.build(vectors, items)
    if kind not in DENSE_KINDS:
        raise UserError(f"Unknown index kind '{kind}'; choose one of {', '.join(KINDS)}.")
    return DenseIndex.build(vectors, kind, items, **params)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference top-k ids by brute-force inner product (NumPy), for recall measurements."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        sims = queries[s : s + 256] @ base.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        ids[s : s + 256] = np.take_along_axis(part, order, 1)
    return ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k over queries (both Q×k id arrays; -1 never matches)."""
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))
