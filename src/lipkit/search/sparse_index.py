"""The sparse index: inverted lists over vocabulary weights (LexLIP heads or any bag of words).

A document is a non-negative V-vector; the lists are stored column-wise (CSC: for each term, the
documents that carry it and their weights), and a query's score for a document is the sparse dot
product, summed over the posting lists of the query's non-zero terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.search.index_format import base_info, default_items, renumber, write_meta


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
        self.info = info or base_info("sparse", self.dim, {})
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
        out = cls(indptr, indices, data, n, base_info("sparse", v, {}), renumber(items, n, 0))
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
        new = renumber(items, n, self.n_docs)
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
            write_meta(tmp, self.info, self.items)

        return write_dir(Path(path), write)


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
