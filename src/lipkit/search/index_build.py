"""Building and extending an index from embeddings folders written by `lipkit embed`: the vectors (or
lexical weights) and items an index of a kind takes from a folder, which build parameters apply to which
kind, and the record of where an index's vectors came from (so a folder is not added twice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lipkit.errors import UserError
from lipkit.search.embeddings_dir import Embeddings, load_embeddings
from lipkit.search.index import KINDS, DenseIndex, build_index
from lipkit.search.sparse_index import SparseIndex, SparseMatrix, read_lexical
from lipkit.search.token_index import TokenIndex

# the build parameters each kind takes (flat, sparse and tokens take none)
KIND_PARAMS = {"hnsw": {"m", "ef", "ef_construction"}, "ivfpq": {"nlist", "m", "nbits", "nprobe"}}


def check_build_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that were given (not None), refusing an unknown kind or one that does not apply."""
    if kind not in KINDS:
        raise UserError(f"Unknown index kind '{kind}'; choose one of {', '.join(KINDS)}.")
    used = {k: v for k, v in params.items() if v is not None}
    wrong = sorted(set(used) - KIND_PARAMS.get(kind, set()))
    if wrong:
        raise UserError(
            f"--{wrong[0].replace('_', '-')} does not apply to a {kind} index; drop it "
            f"(it applies to {'hnsw' if wrong[0] in ('ef', 'ef_construction') else 'ivfpq'})."
        )
    return used


def _items_or_default(emb: Embeddings, n: int) -> list[dict] | None:
    if emb.items and len(emb.items) != n:
        raise UserError(
            f"'{emb.path}' has {n} vectors but ids.json lists {len(emb.items)} items; re-run `lipkit embed`."
        )
    return emb.items or None


def index_input(emb_dir: Path, kind: str) -> tuple[np.ndarray | SparseMatrix, list[dict] | None]:
    """(vectors or lexical matrix, items or None for default ones) of an embeddings folder for an index
    of `kind`."""
    if kind == "sparse":
        emb = load_embeddings(emb_dir, need_dense=False)
        lex = emb.lexical_file()
        if lex is None:
            raise UserError(
                f"'{emb_dir}' has no lex.npy or lex.npz; a sparse index needs N×V non-negative lexical "
                "weights there (from a lexicon head), or build a dense --kind flat|hnsw|ivfpq index."
            )
        matrix = read_lexical(lex)
        return matrix, _items_or_default(emb, matrix.shape[0])
    if kind == "tokens":
        emb = load_embeddings(emb_dir, need_dense=False)
        tokens = emb.image_tokens()
        if tokens is None:
            raise UserError(
                f"'{emb_dir}' has no image_tokens.npy, which `lipkit embed` writes only for a checkpoint trained with "
                "filip or wukong and without --int8; re-run `lipkit embed CHECKPOINT SOURCE DIR --overwrite` with such "
                "a checkpoint, or build a --kind flat index."
            )
        return tokens, _items_or_default(emb, tokens.shape[0])
    emb = load_embeddings(emb_dir)
    x = emb.image()
    return x, _items_or_default(emb, x.shape[0])


def source_entry(emb_dir: Path) -> dict[str, Any]:
    """What index.json records of an embeddings folder added to the index."""
    m = load_embeddings(emb_dir, need_dense=False).manifest
    return {
        "path": str(emb_dir.expanduser().resolve()),
        "fingerprint": m.get("fingerprint"),
        "checkpoint": m.get("checkpoint"),
        "source": m.get("source"),
    }


def build_from_embeddings(
    emb_dir: Path, out: Path, kind: str, data: Any, items: list[dict] | None, params: dict[str, Any]
) -> DenseIndex | SparseIndex | TokenIndex:
    """Build an index of `kind` over `data` (from `index_input(emb_dir, kind)`) and save it to `out`."""
    ix = build_index(data, kind, items, **params)
    ix.info["sources"] = [source_entry(emb_dir)]
    ix.save(out)
    return ix


def new_source(
    ix: DenseIndex | SparseIndex | TokenIndex, emb_dir: Path, allow_duplicates: bool
) -> dict[str, Any]:
    """The source entry of `emb_dir`, refusing a folder whose embeddings the index already holds."""
    entry = source_entry(emb_dir)
    seen = [
        s
        for s in ix.info.get("sources", [])
        if s.get("fingerprint") and s.get("fingerprint") == entry["fingerprint"]
    ]
    if seen and not allow_duplicates:
        raise UserError(
            f"The embeddings in '{emb_dir}' are already in this index (added from {seen[0]['path']}); "
            "pass --allow-duplicates to add them again."
        )
    return entry


def add_to_index(
    ix: DenseIndex | SparseIndex | TokenIndex,
    path: Path,
    data: Any,
    items: list[dict] | None,
    entry: dict[str, Any],
) -> None:
    """Append `data` (from `index_input`) and its source entry to `ix`, and save it to `path`."""
    ix.add(data, items)
    ix.info.setdefault("sources", []).append(entry)
    ix.save(path)
