"""The chunks of an embed job: decoding a chunk's images (through `lipkit.data.images`, the one decode
path), embedding them into the arrays of chunks/NNNNN.npz, and merging finished chunks into one matrix
per modality, the lexical weights and the list of skipped images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lipkit.data.images import try_load_image
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.search.encode import Towers


class _Decode(Dataset):
    """(row, uint8 image or None, why it was skipped) for each row of a chunk."""

    def __init__(self, records: Sequence[Record], rows: Sequence[int], size: int) -> None:
        self.records, self.rows, self.size = records, rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        row = self.rows[i]
        rec = self.records[row]
        x, reason, detail = try_load_image(rec.source, self.size)
        if x is None:
            return row, None, "file not found" if reason == "missing_file" else f"cannot decode: {detail}"
        return row, x, ""


def _keep_list(batch: list) -> list:
    return batch


def chunk_ok(path: Path) -> bool:
    """True for a complete chunk file (a crash leaves none, or an unreadable one)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"rows", "image"} <= set(z.files)
    except (OSError, ValueError):
        return False


@dataclass
class _ChunkParts:
    kept: list[int] = field(default_factory=list)
    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(
        default_factory=list
    )  # (n, T, D) image tokens of a token-wise checkpoint
    lex_rows: list[np.ndarray] = field(default_factory=list)  # non-zero (row, term, weight) of the
    lex_cols: list[np.ndarray] = field(default_factory=list)  # LexLIP image head
    lex_vals: list[np.ndarray] = field(default_factory=list)
    bad_rows: list[int] = field(default_factory=list)
    bad_why: list[str] = field(default_factory=list)

    def add(self, towers: Towers, records: Sequence[Record], batch: list, has_text: bool) -> None:
        """Embed the decoded images of a batch (and their first captions); note the skipped ones."""
        good = [(r, x) for r, x, _ in batch if x is not None]
        for r, x, why in batch:
            if x is None:
                self.bad_rows.append(r)
                self.bad_why.append(why)
        if not good:
            return
        first = len(self.kept)
        self.kept.extend(r for r, _ in good)
        batch_u8 = torch.stack([x for _, x in good])
        if towers.images_and_tokens is not None:  # one image-tower pass for both
            pooled, tokens = towers.images_and_tokens(batch_u8)
            self.image.append(pooled)
            self.tokens.append(tokens)
        else:
            self.image.append(towers.images(batch_u8))
        if towers.lexical is not None:
            r_, c_ = np.nonzero(lex := towers.lexical(batch_u8))
            self.lex_rows.append(r_ + first)
            self.lex_cols.append(c_)
            self.lex_vals.append(lex[r_, c_])
        if has_text:
            self.text.append(towers.texts([records[r].captions[0] for r, _ in good]))

    def arrays(self, dim: int, has_text: bool, has_lexicon: bool, has_tokens: bool) -> dict[str, np.ndarray]:
        out = {
            "rows": np.asarray(self.kept, dtype=np.int64),
            "image": np.concatenate(self.image) if self.image else np.zeros((0, dim), np.float32),
            "bad_rows": np.asarray(self.bad_rows, dtype=np.int64),
            "bad_why": np.asarray(self.bad_why, dtype=str) if self.bad_why else np.zeros(0, dtype="<U1"),
        }
        if has_text:
            out["text"] = np.concatenate(self.text) if self.text else np.zeros((0, dim), np.float32)
        if self.tokens:
            out["tokens"] = np.concatenate(self.tokens)
        elif has_tokens:  # no image of the chunk decoded: an empty (0, 0, dim) array marks it as token-wise
            out["tokens"] = np.zeros((0, 0, dim), np.float32)
        if has_lexicon:
            out["lex_row"] = np.concatenate([np.zeros(0, np.int64), *self.lex_rows]).astype(np.int64)
            out["lex_col"] = np.concatenate([np.zeros(0, np.int64), *self.lex_cols]).astype(np.int64)
            out["lex_val"] = np.concatenate([np.zeros(0, np.float32), *self.lex_vals]).astype(np.float32)
        return out


def compute_chunk(
    towers: Towers,
    records: Sequence[Record],
    rows: Sequence[int],
    *,
    has_text: bool,
    batch_size: int,
    workers: int,
    advance: Callable[[int], Any],
) -> dict[str, np.ndarray]:
    """The arrays of one chunk file: rows kept, image (and text) embeddings, lexical non-zeros, and the
    rows skipped with why. `advance(n)` after every batch of n rows."""
    loader = DataLoader(
        _Decode(records, rows, towers.image_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_keep_list,
    )
    parts = _ChunkParts()
    for batch in loader:
        parts.add(towers, records, batch, has_text)
        advance(len(batch))
    return parts.arrays(towers.dim, has_text, towers.has_lexicon, towers.images_and_tokens is not None)


@dataclass
class Merged:
    """All chunks together: the embedded rows of the collection, in order, and what they hold."""

    rows: np.ndarray
    image: np.ndarray
    text: np.ndarray | None
    lex: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (row, term, weight) over `rows` positions
    skipped: list[dict[str, str]]


def merge_chunks(
    files: Sequence[Path], records: Sequence[Record], has_text: bool, has_lexicon: bool
) -> Merged:
    rows_all, imgs, txts, skipped = [], [], [], []
    lex_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for path in files:
        with np.load(path, allow_pickle=False) as z:
            if has_lexicon:  # chunk-local rows → rows of the whole collection
                offset = sum(len(r) for r in rows_all)
                lex_parts.append((z["lex_row"] + offset, z["lex_col"], z["lex_val"]))
            rows_all.append(z["rows"])
            imgs.append(z["image"])
            if has_text:
                txts.append(z["text"])
            skipped.extend(
                {"path": records[int(r)].key, "reason": str(w)}
                for r, w in zip(z["bad_rows"], z["bad_why"], strict=True)
            )
    lex = None
    if has_lexicon:
        lex = tuple(np.concatenate([p[i] for p in lex_parts]) for i in range(3))
    return Merged(
        np.concatenate(rows_all),
        np.concatenate(imgs).astype(np.float32),
        np.concatenate(txts).astype(np.float32) if has_text else None,
        lex,  # type: ignore[arg-type]
        skipped,
    )


def write_tokens(files: Sequence[Path], n_rows: int, path: Path) -> None:
    """The chunks' image tokens, streamed into one float32 N×T×D .npy at `path` (through a temporary file
    and a rename): never the whole array in memory. Chunks without tokens (an older lipkit's) are refused."""
    tmp, at, out = path.with_name(path.name + ".tmp"), 0, None
    try:
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                if "tokens" not in z.files:
                    raise UserError(
                        f"Chunk '{f}' was written without image tokens (by an older lipkit); pass --overwrite to "
                        "embed the collection again."
                    )
                part = z["tokens"]
            if not len(part):
                continue
            if out is None:
                shape = (n_rows, *part.shape[1:])
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            out[at : at + len(part)] = part
            at += len(part)
        assert out is not None and at == n_rows, "every embedded row has its tokens"
        out.flush()
        del out
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
