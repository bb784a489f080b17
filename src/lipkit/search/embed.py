"""Embed a collection (a captions table or a folder of images) into a folder of vectors (the model
calls are in `search.encode`, the chunk work in `search.embed_chunks`).

An embeddings folder:
  manifest.json   source, checkpoint fingerprint, counts, chunk size, whether it is complete, and the
                  encoder: the checkpoint's PyTorch towers, or (`--int8 DIR`) the onnxruntime folder
                  `lipkit quantize` wrote, with the precision of each tower
  image_emb.npy   float32 N×D, L2-normalised image embeddings, row i = item i
  text_emb.npy    float32 N×D embeddings of each item's first caption (tables only)
  image_tokens.npy  float32 N×T×D L2-normalised image token features when the checkpoint is scored token-wise
                  (FILIP, Wukong: eval's late interaction): what `lipkit index build --kind tokens` indexes
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

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lipkit.atomic import atomic_write, job_manifest, save_npy_atomic, save_npz_atomic, write_json_atomic
from lipkit.data.frames import with_frame_count
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.search.collection import checkpoint_fingerprint, collect, records_fingerprint
from lipkit.search.embed_chunks import Merged, chunk_ok, compute_chunk, merge_chunks, write_tokens
from lipkit.search.encode import Towers
from lipkit.search.onnx_encoder import onnx_towers_of
from lipkit.text.tokenizer import TextTokenizer

FORMAT = "lipkit-embeddings"
OUR_FILES = (
    "manifest.json",
    "image_emb.npy",
    "text_emb.npy",
    "lex.npz",
    "image_tokens.npy",
    "images.bin",
    "ids.json",
    "skipped.json",
    "chunks",
)


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


def _result_of(out: Path, manifest: dict[str, Any]) -> EmbedResult:
    m = manifest
    return EmbedResult(
        out, m["n_items"], m["n_embedded"], m["n_skipped"], m["dim"], m["has_text"], m["n_chunks"], 0
    )


def _remove_ours(out: Path) -> None:
    for name in OUR_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def _check_out(out: Path, fp: dict[str, str], chunk_size: int, overwrite: bool) -> EmbedResult | None:
    """Make `out` ready for this job: refuse a file, a foreign folder or other embeddings (unless
    `overwrite`, which removes them); the result of the finished job when it is already complete."""
    manifest = job_manifest(out, "manifest.json", FORMAT, "embeddings")
    if manifest is None:
        return None
    if overwrite:
        _remove_ours(out)
        return None
    if manifest.get("fingerprint") != fp or manifest.get("chunk_size") != chunk_size:
        raise UserError(
            f"'{out}' holds embeddings of another source, checkpoint or chunk size; pass --overwrite "
            "to replace them or choose a new OUT."
        )
    return _result_of(out, manifest) if manifest.get("complete") else None


def progress_bar(enabled: bool = True) -> Progress:
    """The bar of long curation and embedding jobs: description, bar, done/total, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _items(records: Sequence[Record], rows: np.ndarray, blobs: Path) -> list[dict[str, Any]]:
    """ids.json: one entry per embedded row; images stored inline point into `blobs` (images.bin)."""
    items, offset, inline = [], 0, []
    for i, r in enumerate(rows.tolist()):
        rec = records[r]
        data = rec.data  # read once: a lazy record (a saved HF dataset) fetches it on each access
        item: dict[str, Any] = {
            "id": i,
            "path": None if data is not None else str(Path(rec.image).resolve()),
            "key": rec.key,
            "caption": rec.captions[0] if rec.captions else None,
            "meta": rec.meta,
        }
        if data is not None:  # served from images.bin by `lipkit serve` (GET /image/{id})
            item["blob"] = {"file": str(blobs.resolve()), "offset": offset, "size": len(data)}
            offset += len(data)
            inline.append(r)
        items.append(item)
    if offset:  # the encoded bytes of images that live inside shards/parquet (no file of their own)

        def write(f: Any) -> None:
            for r in inline:  # one image in memory at a time (records may read their bytes lazily)
                f.write(records[r].data)

        atomic_write(blobs, write)
    return items


def _write_outputs(out: Path, records: Sequence[Record], merged: Merged, vocab: int) -> list[dict[str, Any]]:
    """image_emb.npy, text_emb.npy, lex.npz, images.bin, ids.json and skipped.json; the items."""
    items = _items(records, merged.rows, out / "images.bin")
    save_npy_atomic(out / "image_emb.npy", merged.image)
    if merged.text is not None:
        save_npy_atomic(out / "text_emb.npy", merged.text)
    if merged.lex is not None:  # SciPy's save_npz "coo" layout (read without SciPy by read_lexical)
        row, col, data = merged.lex
        save_npz_atomic(
            out / "lex.npz",
            format=np.asarray("coo"),
            shape=np.asarray([len(items), vocab], dtype=np.int64),
            row=row,
            col=col,
            data=data,
        )
    write_json_atomic(out / "ids.json", items, indent=None)
    write_json_atomic(out / "skipped.json", merged.skipped, indent=None)
    return items


def embed_collection(
    model: DualEncoder, tokenizer: TextTokenizer, records: Sequence[Record], out: str | Path, **kwargs: Any
) -> EmbedResult:
    """Embed `records` into `out` with a PyTorch model (see `embed_towers`)."""
    return embed_towers(Towers.of_model(model, tokenizer), records, out, **kwargs)


def embed_towers(
    towers: Towers,
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
    if (finished := _check_out(out, fp, chunk_size, overwrite)) is not None:
        return finished
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    n, dim = len(records), towers.dim
    n_chunks = (n + chunk_size - 1) // chunk_size
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
    if towers.images_and_tokens is not None:  # a token-wise index over them needs a token-wise checkpoint
        manifest["token_wise"] = {"tokens_kept": towers.tokens_kept}
    write_json_atomic(out / "manifest.json", manifest)
    files = [out / "chunks" / f"{c:05d}.npz" for c in range(n_chunks)]
    done = {c for c in range(n_chunks) if files[c].is_file() and chunk_ok(files[c])}
    with progress_bar(progress) as bar:
        task = bar.add_task("embedding", total=n)
        bar.advance(task, sum(min(chunk_size, n - c * chunk_size) for c in done))
        for c in sorted(set(range(n_chunks)) - done):
            rows = range(c * chunk_size, min(n, (c + 1) * chunk_size))
            arrays = compute_chunk(
                towers,
                records,
                list(rows),
                has_text=has_text,
                batch_size=batch_size,
                workers=workers,
                advance=lambda k: bar.advance(task, k),
            )
            save_npz_atomic(files[c], **arrays)
    merged = merge_chunks(files, records, has_text, towers.has_lexicon)
    if towers.images_and_tokens is not None and len(merged.rows):
        write_tokens(files, len(merged.rows), out / "image_tokens.npy")
    items = _write_outputs(out, records, merged, towers.lexicon_vocab)
    manifest.update(complete=True, n_embedded=len(items), n_skipped=len(merged.skipped))
    write_json_atomic(out / "manifest.json", manifest)
    shutil.rmtree(out / "chunks", ignore_errors=True)
    return EmbedResult(
        out, n, len(items), len(merged.skipped), dim, has_text, len(done), n_chunks - len(done)
    )


def run_embed(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "captions",
    device: str = "auto",
    int8: str | Path | None = None,
    threads: int = 0,
    tokens: bool = True,
    **kwargs: Any,
) -> EmbedResult:
    """`lipkit embed`: the checkpoint's PyTorch towers, or with `int8` the ONNX folder `lipkit quantize`
    wrote from it (onnxruntime, `threads` intra-op threads, 0: its default); the manifest says which. `tokens`:
    also the image tokens of a checkpoint scored token-wise (image_tokens.npy, for a tokens index)."""
    records = collect(source, image_column, caption_column)  # a bad source fails before the model loads
    if int8 is not None:
        encoder = onnx_towers_of(checkpoint, int8, threads)
        towers, used = Towers.of_onnx(encoder), {"onnx": encoder.fingerprint()}
        about: dict[str, Any] = {"runtime": "onnxruntime", **encoder.describe()}
    else:
        towers, used, about = (
            Towers.of_checkpoint(checkpoint, device, tokens=tokens),
            {},
            {"runtime": "torch"},
        )
    if any(r.frames is not None for r in records):  # clips: as many frames as the model was trained on
        if not towers.clip_frames:
            raise UserError(
                f"{source} holds clips; the ONNX towers embed images only: embed it without --int8."
            )
        with_frame_count(records, towers.clip_frames)
    return embed_towers(
        towers,
        records,
        out,
        fingerprint={"checkpoint": checkpoint_fingerprint(checkpoint), **used},
        extra_manifest={
            "source": str(Path(source).expanduser().resolve()),
            "checkpoint": str(checkpoint),
            "encoder": about,
        },
        **kwargs,
    )
