"""Embed a collection (a captions table or a folder of images) into a folder of vectors, and embed
queries (text, image files, uploaded bytes) with the same model.

An embeddings folder:
  manifest.json   source, checkpoint fingerprint, counts, chunk size, whether it is complete
  image_emb.npy   float32 N×D, L2-normalised image embeddings, row i = item i
  text_emb.npy    float32 N×D embeddings of each item's first caption (tables only)
  lex.npz         N×V non-negative term weights (SciPy coo layout) when the model has LexLIP heads:
                  what `lipkit index build --kind sparse` indexes
  images.bin      the encoded bytes of images stored inside shards or parquet (items point into it with
                  "blob": {"file", "offset", "size"}), so a server can show them
  ids.json        [{"id", "path", "caption", "meta"}] for the N embedded items, in row order
  skipped.json    images that could not be decoded (path and reason); they get no row
While it runs, finished chunks live in chunks/NNNNN.npz (written atomically); a rerun with the same
source and checkpoint skips them, so an interrupted job continues after its last complete chunk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader, Dataset

from lipkit.atomic import save_npy_atomic, save_npz_atomic, write_json_atomic
from lipkit.data.images import load_image
from lipkit.data.records import Record
from lipkit.device import pick_device
from lipkit.errors import UserError
from lipkit.malloc import keep_freed_memory
from lipkit.models.dual_encoder import DualEncoder
from lipkit.search.collection import (  # noqa: F401 - collect and IMAGE_EXTS re-exported
    IMAGE_EXTS,
    _inline,
    _key,
    checkpoint_fingerprint,
    collect,
    records_fingerprint,
)
from lipkit.search.embeddings_dir import Embeddings, load_embeddings  # noqa: F401 - re-exported
from lipkit.text.tokenizer import TextTokenizer

FORMAT = "lipkit-embeddings"
OUR_FILES = (
    "manifest.json",
    "image_emb.npy",
    "text_emb.npy",
    "lex.npz",
    "images.bin",
    "ids.json",
    "skipped.json",
    "chunks",
)


# ----------------------------------------------------------------------------------------------
# embedding a collection


class _Decode(Dataset):
    def __init__(self, records: Sequence[Record], rows: Sequence[int], size: int) -> None:
        self.records, self.rows, self.size = records, rows, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        row = self.rows[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                rec = self.records[row]
                data = _inline(rec)
                src = io.BytesIO(data) if data is not None else rec.image
                return row, load_image(src, self.size), ""  # type: ignore[arg-type]
        except FileNotFoundError:
            return row, None, "file not found"
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as e:
            return row, None, f"cannot decode: {e}"


def _keep_list(batch: list) -> list:
    return batch


@torch.inference_mode()
def encode_images(model: DualEncoder, images_u8: torch.Tensor) -> np.ndarray:
    """uint8 (B,3,S,S) at the model's size → float32 (B,D) L2-normalised embeddings."""
    return model.embed_images_u8(images_u8).numpy()


@torch.inference_mode()
def encode_images_lexical(model: DualEncoder, images_u8: torch.Tensor) -> np.ndarray:
    """uint8 (B,3,S,S) → float32 (B,V) non-negative term weights from the model's LexLIP image head."""
    return model.lexical_images_u8(images_u8).clamp_min(0).numpy()


@torch.inference_mode()
def encode_texts(model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str]) -> np.ndarray:
    return model.encode_text(tokenizer(list(texts)).to(model.device)).float().cpu().numpy()


@dataclass
class EmbedResult:
    out: Path
    n_items: int
    n_embedded: int
    n_skipped: int
    dim: int
    has_text: bool
    chunks_done_before: int  # chunks found complete when the run started (resumed work)
    chunks_computed: int


def embed_collection(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    records: Sequence[Record],
    out: str | Path,
    *,
    fingerprint: dict[str, str] | None = None,
    batch_size: int = 256,
    chunk_size: int = 4096,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> EmbedResult:
    """Embed `records` into `out` (see the module doc); resumes from complete chunks already there."""
    out = Path(out).expanduser()
    if batch_size < 1 or chunk_size < 1:
        raise UserError("--batch-size and --chunk-size must be at least 1.")
    if not records:
        raise UserError("There is nothing to embed: the source has no rows.")
    has_text = all(r.captions for r in records)
    fp = {"items": records_fingerprint(records), **(fingerprint or {})}
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] | None = None
    if out.exists():
        if not out.is_dir():
            raise UserError(f"Output '{out}' is a file; pass a folder path for the embeddings.")
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                manifest = {}
            if manifest.get("format") != FORMAT:
                raise UserError(f"'{manifest_path}' is not a lipkit embeddings manifest; choose another OUT.")
            same = manifest.get("fingerprint") == fp and manifest.get("chunk_size") == chunk_size
            if overwrite:
                for name in OUR_FILES:
                    target = out / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
                manifest = None
            elif not same:
                raise UserError(
                    f"'{out}' holds embeddings of another source, checkpoint or chunk size; pass --overwrite "
                    "to replace them or choose a new OUT."
                )
            elif manifest.get("complete"):
                return EmbedResult(
                    out,
                    manifest["n_items"],
                    manifest["n_embedded"],
                    manifest["n_skipped"],
                    manifest["dim"],
                    manifest["has_text"],
                    manifest["n_chunks"],
                    0,
                )
        elif any(out.iterdir()):
            raise UserError(
                f"Output '{out}' exists and is not an embeddings folder; choose a new or empty OUT folder."
            )
    out.mkdir(parents=True, exist_ok=True)
    chunks = out / "chunks"
    chunks.mkdir(exist_ok=True)
    n = len(records)
    n_chunks = (n + chunk_size - 1) // chunk_size
    dim = int(model.spec.embed_dim)
    manifest = {
        "format": FORMAT,
        "version": 1,
        **(extra_manifest or {}),
        "fingerprint": fp,
        "chunk_size": chunk_size,
        "n_chunks": n_chunks,
        "n_items": n,
        "dim": dim,
        "has_text": has_text,
        "complete": False,
    }
    write_json_atomic(manifest_path, manifest)

    def chunk_file(c: int) -> Path:
        return chunks / f"{c:05d}.npz"

    def chunk_ok(c: int) -> bool:
        try:
            with np.load(chunk_file(c), allow_pickle=False) as z:
                return {"rows", "image"} <= set(z.files)
        except (OSError, ValueError):
            return False

    done = {c for c in range(n_chunks) if chunk_file(c).is_file() and chunk_ok(c)}
    computed = 0
    size = int(model.spec.image_size)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task("embedding", total=n)
        bar.advance(task, sum(min(chunk_size, n - c * chunk_size) for c in done))
        for c in range(n_chunks):
            if c in done:
                continue
            rows = list(range(c * chunk_size, min(n, (c + 1) * chunk_size)))
            loader = DataLoader(
                _Decode(records, rows, size),
                batch_size=batch_size,
                num_workers=workers,
                collate_fn=_keep_list,
            )
            kept: list[int] = []
            img_parts: list[np.ndarray] = []
            txt_parts: list[np.ndarray] = []
            lex_rows: list[np.ndarray] = []  # non-zero (row, term, weight) of the LexLIP image head
            lex_cols: list[np.ndarray] = []
            lex_vals: list[np.ndarray] = []
            bad_rows: list[int] = []
            bad_why: list[str] = []
            for batch in loader:
                good = [(r, x) for r, x, _ in batch if x is not None]
                for r, x, why in batch:
                    if x is None:
                        bad_rows.append(r)
                        bad_why.append(why)
                if good:
                    first = len(kept)
                    kept.extend(r for r, _ in good)
                    batch_u8 = torch.stack([x for _, x in good])
                    img_parts.append(encode_images(model, batch_u8))
                    if model.has_lexicon:
                        r_, c_ = np.nonzero(lex := encode_images_lexical(model, batch_u8))
                        lex_rows.append(r_ + first)
                        lex_cols.append(c_)
                        lex_vals.append(lex[r_, c_])
                    if has_text:
                        txt_parts.append(
                            encode_texts(model, tokenizer, [records[r].captions[0] for r, _ in good])
                        )
                bar.advance(task, len(batch))
            arrays = {
                "rows": np.asarray(kept, dtype=np.int64),
                "image": np.concatenate(img_parts) if img_parts else np.zeros((0, dim), np.float32),
                "bad_rows": np.asarray(bad_rows, dtype=np.int64),
                "bad_why": np.asarray(bad_why, dtype=str) if bad_why else np.zeros(0, dtype="<U1"),
            }
            if has_text:
                arrays["text"] = np.concatenate(txt_parts) if txt_parts else np.zeros((0, dim), np.float32)
            if model.has_lexicon:
                arrays["lex_row"] = np.concatenate([np.zeros(0, np.int64), *lex_rows]).astype(np.int64)
                arrays["lex_col"] = np.concatenate([np.zeros(0, np.int64), *lex_cols]).astype(np.int64)
                arrays["lex_val"] = np.concatenate([np.zeros(0, np.float32), *lex_vals]).astype(np.float32)
            save_npz_atomic(chunk_file(c), **arrays)
            computed += 1

    # finalise: one matrix per modality, the items list, the skipped list
    rows_all, imgs, txts, skipped = [], [], [], []
    lex_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for c in range(n_chunks):
        with np.load(chunk_file(c), allow_pickle=False) as z:
            if model.has_lexicon:  # chunk-local rows → rows of the whole collection
                offset = sum(len(r) for r in rows_all)
                lex_parts.append((z["lex_row"] + offset, z["lex_col"], z["lex_val"]))
            rows_all.append(z["rows"])
            imgs.append(z["image"])
            if has_text:
                txts.append(z["text"])
            skipped.extend(
                {"path": _key(records[int(r)]), "reason": str(w)}
                for r, w in zip(z["bad_rows"], z["bad_why"], strict=True)
            )
    rows = np.concatenate(rows_all)
    image_emb = np.concatenate(imgs).astype(np.float32)
    items = []
    blobs = out / "images.bin"  # the encoded bytes of images that live inside shards/parquet (no file)
    blob_tmp = blobs.with_name(f".images.bin.{uuid.uuid4().hex}.tmp")
    offset = 0
    with open(blob_tmp, "wb") as blob_file:
        for i, r in enumerate(rows.tolist()):
            rec = records[r]
            data = _inline(rec)
            item: dict[str, Any] = {
                "id": i,
                "path": None if data is not None else str(Path(rec.image).resolve()),
                "key": _key(rec),
                "caption": rec.captions[0] if rec.captions else None,
                "meta": rec.meta,
            }
            if data is not None:  # served from images.bin by `lipkit serve` (GET /image/{id})
                blob_file.write(data)
                item["blob"] = {"file": str(blobs.resolve()), "offset": offset, "size": len(data)}
                offset += len(data)
            items.append(item)
    if offset:
        os.replace(blob_tmp, blobs)
    else:
        blob_tmp.unlink()
    save_npy_atomic(out / "image_emb.npy", image_emb)
    if has_text:
        save_npy_atomic(out / "text_emb.npy", np.concatenate(txts).astype(np.float32))
    if model.has_lexicon:  # SciPy's save_npz "coo" layout (read without SciPy by search.index.read_lexical)
        save_npz_atomic(
            out / "lex.npz",
            format=np.asarray("coo"),
            shape=np.asarray([len(items), model.spec.lexicon_vocab], dtype=np.int64),
            row=np.concatenate([p[0] for p in lex_parts]),
            col=np.concatenate([p[1] for p in lex_parts]),
            data=np.concatenate([p[2] for p in lex_parts]),
        )
    write_json_atomic(out / "ids.json", items)
    write_json_atomic(out / "skipped.json", skipped)
    manifest.update(complete=True, n_embedded=len(items), n_skipped=len(skipped))
    write_json_atomic(manifest_path, manifest)
    shutil.rmtree(chunks, ignore_errors=True)
    return EmbedResult(out, n, len(items), len(skipped), dim, has_text, len(done), computed)


def run_embed(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "captions",
    device: str = "auto",
    **kwargs: Any,
) -> EmbedResult:
    from lipkit.checkpoint import load_checkpoint

    records = collect(source, image_column, caption_column)  # a bad source fails before the model loads
    model, tokenizer, _ = load_checkpoint(checkpoint)
    model.to(pick_device(device))
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()  # CPU embedding without a page fault per batch (lipkit/malloc.py)
    return embed_collection(
        model,
        tokenizer,
        records,
        out,
        fingerprint={"checkpoint": checkpoint_fingerprint(checkpoint)},
        extra_manifest={"source": str(Path(source).expanduser().resolve()), "checkpoint": str(checkpoint)},
        **kwargs,
    )
