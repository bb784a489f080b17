"""`lipkit data score`: the CLIP score of every image–caption pair of a source, with a checkpoint's towers.

The score is DataComp's CLIP score (Gadre et al., 2023, "DataComp: In search of the next generation of
multimodal datasets"; the filter LAION-400M used, Schuhmann et al., 2021): the cosine similarity of the
L2-normalised image and text embeddings, s(i, t) = <f(i)/|f(i)|, g(t)/|g(t)|> in [-1, 1], with no
temperature. Rows with several captions get one score per caption: `clip_scores` (a list, in caption
order) and `clip_score`, the highest of them (the caption that describes the image best: a row is as
good as its best caption; filtering on the first caption would punish rows whose first caption is a
short label).

OUT (a folder):
  score.json      manifest: source, checkpoint fingerprint, chunk size, complete, counts, score stats
  scored.jsonl    the source's rows (every column, image paths made absolute, `key`) + the two scores,
  or shards/      for sources that hold images inline: WebDataset shards with the scores in each JSON
  skipped.json    pairs left out, with why (an image that cannot be decoded, no caption)
With `truth` (a JSONL of {key, mispaired}, the truth.jsonl of `lipkit data build noisy`), score.json also
holds the AUC of clip_score at ranking true pairs above mispaired ones (Mann–Whitney's rank formula).
While it runs, finished chunks (`chunk_size` pairs in source order) live in chunks/NNNNN.npz, each
written atomically with a digest of its keys, captions and images; a rerun with the same source, checkpoint and
chunk size reads them instead of scoring again. The source is streamed: one chunk of images in memory.
Image embeddings can come from a `lipkit embed` folder of the same checkpoint (`embeddings`); captions
are always embedded here (that folder holds the first caption only).

Not done: the text-based filters DataComp combines with the score (language id, caption length), and
any threshold: `lipkit data filter` keeps pairs by threshold or by fraction.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.atomic import job_manifest, save_npz_atomic, write_json_atomic
from lipkit.curate.pairs_out import PairsOut, move_into, source_inside, source_name
from lipkit.curate.score_chunks import (
    ImageLookup,
    chunk_digest,
    chunks,
    embeddings_lookup,
    load_chunk,
    score_chunk,
)
from lipkit.curate.separation import auc, read_truth
from lipkit.data.inspection import score_histogram
from lipkit.data.records import Record, Skip
from lipkit.data.sources.registry import estimate_total, scan
from lipkit.errors import UserError
from lipkit.search.collection import checkpoint_fingerprint
from lipkit.search.embed import progress_bar
from lipkit.search.encode import Towers

FORMAT = "lipkit-scores"
TABLE = "scored.jsonl"
OUR_FILES = ("score.json", TABLE, "shards", "skipped.json", "chunks")


def source_state(source: str | Path) -> str | None:
    """What changes when a local source does: a table file's size and modification time, or a digest of
    those of a folder's files (shards, images); None for patterns and URLs (their chunks still check)."""
    s = str(source)
    path = Path(s).expanduser()
    if s.startswith("pipe:") or "://" in s or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:  # a folder's files at every depth (image folders, a DatasetDict's splits)
        if any(part.startswith(".") for part in f.relative_to(path).parts):
            continue
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def score_stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {}
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    out = {"mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max()}
    out.update({f"p{p}": x for p, x in zip((10, 25, 50, 75, 90), q, strict=True)})
    return {k: round(float(x), 4) for k, x in out.items()} | {"histogram": score_histogram(v.tolist())}


@dataclass
class _Tally:
    """What the pass found: scores, pairs left out (by reason), and the scores of the pairs `truth`
    (key → mispaired) knows, with their labels."""

    truth: dict[str, bool] | None
    scored: int = 0
    captions: int = 0
    best: list[float] = field(default_factory=list)
    known: list[float] = field(default_factory=list)
    mispaired: list[bool] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    left_out: list[dict[str, str]] = field(default_factory=list)

    def skip(self, key: str, reason: str, count: int = 1) -> None:
        self.skipped[reason.split(":")[0]] += count
        self.left_out.append({"key": key, "reason": reason})

    def add(self, record: Record, values: list[float]) -> None:
        self.scored += 1
        self.captions += len(values)
        self.best.append(max(values))
        if self.truth is not None and record.key in self.truth:
            self.known.append(max(values))
            self.mispaired.append(self.truth[record.key])

    def auc(self) -> dict[str, Any] | None:
        """AUC of the best score, true pairs vs mispaired ones, over the pairs the truth knows."""
        if self.truth is None:
            return None
        if not self.known:
            raise UserError("None of the scored pairs is in the --truth file; pass the truth of this source.")
        labels = np.asarray(self.mispaired, dtype=bool)
        value = auc(self.known, ~labels)
        return {"auc": round(value, 4), "pairs": len(labels), "mispaired": int(labels.sum())}


@dataclass
class ScoreResult:
    out: Path
    output: str  # what holds the scored pairs, relative to `out`: scored.jsonl or shards
    scored: int
    captions: int
    skipped: dict[str, int]
    stats: dict[str, Any]
    truth: dict[str, Any] | None  # {auc, pairs, mispaired}: true vs mispaired pairs (--truth)
    chunks_done_before: int = 0  # chunks found finished when the run started (resumed work)
    chunks_computed: int = 0


def _truth_of_output(out: Path, m: dict[str, Any], known: dict[str, bool]) -> dict[str, Any]:
    """The manifest `m` of a finished run with its "truth" ({auc, pairs, mispaired}) measured on the
    written scores against `known` (key → mispaired): a rerun with --truth after scoring without it."""
    from lipkit.curate.filter import read_scores  # filter reads score's output: imported when needed

    read = read_scores(str(out / m["output"]), "image", "captions", progress=False)
    keys = [r.key for r in read["stubs"]]
    pairs = [(s, known[k]) for s, k in zip(read["scores"], keys, strict=True) if k in known]
    if not pairs or all(bad for _, bad in pairs) or not any(bad for _, bad in pairs):
        return {**m, "truth": None}
    value = auc([s for s, _ in pairs], [not bad for _, bad in pairs])
    return {
        **m,
        "truth": {"auc": round(value, 4), "pairs": len(pairs), "mispaired": sum(b for _, b in pairs)},
    }


def _result(out: Path, m: dict[str, Any], before: int = 0, computed: int = 0) -> ScoreResult:
    return ScoreResult(
        out,
        m["output"],
        m["scored"],
        m["captions"],
        m["skipped"],
        m["stats"],
        m.get("truth"),
        before,
        computed,
    )


def _check_out(out: Path, source: str | Path, fp: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Make `out` ready: refuse the source's own folder, a file, a foreign folder or other scores (unless
    `overwrite`, which removes them); the manifest of a finished job of this same work."""
    if source_inside(source, out):
        raise UserError(f"OUT '{out}' is or holds the source '{source}'; choose an OUT folder outside it.")
    manifest = job_manifest(out, "score.json", FORMAT, "scores")
    if manifest is None:
        return None
    if overwrite:
        for name in OUR_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return None
    if manifest.get("fingerprint") != fp:
        raise UserError(
            f"'{out}' holds scores of another source (or the source changed since), checkpoint, columns or "
            "chunk size; pass --overwrite to replace them or choose a new OUT."
        )
    return manifest if manifest.get("complete") else None


def _start(out: Path, fp: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """Begin (or continue) a job in `out`: chunks/ ready, a killed run's half output removed, the
    manifest of an unfinished job written; returns it."""
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".writing-*"):  # the output of a run that was killed before it finished
        shutil.rmtree(stale, ignore_errors=True)
    manifest = {"format": FORMAT, "version": 1, **(extra or {}), "fingerprint": fp, "complete": False}
    write_json_atomic(out / "score.json", manifest)
    return manifest


def _emit(records: list[Record], arrays: dict[str, np.ndarray], writer: PairsOut, tally: _Tally) -> None:
    """Write a chunk's scored pairs (in source order) and note the ones left out."""
    rows, offsets, scores = arrays["rows"].tolist(), arrays["offsets"], arrays["scores"]
    for j, r in enumerate(rows):
        values = [round(float(x), 6) for x in scores[offsets[j] : offsets[j + 1]]]
        fields = {"clip_score": max(values), "clip_scores": values}
        if (lost := writer.write(records[r], fields)) is not None:
            tally.skip(lost.key, f"{lost.reason}: {lost.detail}")
            continue
        tally.add(records[r], values)
    for r, why in zip(arrays["bad_rows"].tolist(), arrays["bad_why"].tolist(), strict=True):
        tally.skip(records[r].key, why)


def _score_pass(
    towers: Towers, items: Iterator[Record | Skip], work: Path, writer: PairsOut, tally: _Tally, **kw: Any
) -> tuple[int, int]:
    """Score every chunk not finished in `work` (chunks/NNNNN.npz) and write all pairs; (reused, computed)."""
    before = computed = 0
    with progress_bar(kw.pop("progress")) as bar:
        images = bar.add_task("images", total=kw.pop("total"))
        texts = bar.add_task("captions", total=None)
        for c, (records, skips) in enumerate(chunks(items, kw.pop("chunk_size"))):
            for s in skips:
                tally.skip(s.key, f"{s.reason}: {s.detail}" if s.detail else s.reason, s.count)
            bar.advance(images, sum(s.count for s in skips))
            if not records:
                continue
            path = work / f"{c:05d}.npz"
            arrays = load_chunk(path, chunk_digest(records))
            if arrays is None:
                arrays = score_chunk(
                    towers,
                    records,
                    advance_images=lambda n: bar.advance(images, n),
                    advance_texts=lambda n: bar.advance(texts, n),
                    **kw,
                )
                save_npz_atomic(path, **arrays)
                computed += 1
            else:
                before += 1
                bar.advance(images, len(records))
            _emit(records, arrays, writer, tally)
    return before, computed


def score_source(
    towers: Towers,
    source: str | Path,
    out: str | Path,
    *,
    fingerprint: dict[str, Any],
    lookup: ImageLookup | None = None,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    batch_size: int = 256,
    chunk_size: int = 2048,
    workers: int = 0,
    truth: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> ScoreResult:
    """Score every pair of `source` into `out` (see the module doc); resumes from finished chunks."""
    out = Path(out).expanduser()
    if batch_size < 1 or chunk_size < 1:
        raise UserError("--batch-size and --chunk-size must be at least 1.")
    known = read_truth(truth) if truth is not None else None
    columns = [image_column, caption_column, str(image_root)]
    fp = {
        "source": source_name(source),
        "source_state": source_state(source),
        "columns": columns,
        "chunk_size": chunk_size,
        **fingerprint,
    }
    if (finished := _check_out(out, source, fp, overwrite)) is not None:
        return _result(out, finished if known is None else _truth_of_output(out, finished, known))
    manifest = _start(out, fp, extra_manifest)
    tally, tmp = _Tally(known), Path(tempfile.mkdtemp(prefix=".writing-", dir=out))
    writer = PairsOut(tmp, TABLE, image_column, caption_column)
    try:
        items = scan(source, image_column, caption_column, image_root)
        before, computed = _score_pass(
            towers,
            items,
            out / "chunks",
            writer,
            tally,
            lookup=lookup,
            batch_size=batch_size,
            workers=workers,
            chunk_size=chunk_size,
            progress=progress,
            total=estimate_total(source),
        )
        output = writer.close()
        if output is None:
            raise UserError(
                f"None of the {sum(tally.skipped.values())} pairs of '{source}' could be scored (see the "
                "reasons above); fix their images or captions and run the command again."
            )
        move_into(tmp, out)
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(out / "skipped.json", tally.left_out, indent=None)
    manifest.update(
        complete=True,
        output=output,
        scored=tally.scored,
        captions=tally.captions,
        skipped=dict(tally.skipped),
        stats=score_stats(tally.best),
        truth=tally.auc(),
    )
    write_json_atomic(out / "score.json", manifest)
    shutil.rmtree(out / "chunks", ignore_errors=True)
    return _result(out, manifest, before, computed)


def run_score(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    embeddings: str | Path | None = None,
    device: str = "auto",
    **kwargs: Any,
) -> ScoreResult:
    """`lipkit data score`: the checkpoint's PyTorch towers; image embeddings from `embeddings` (a `lipkit
    embed` folder of this checkpoint) where it has them."""
    columns = (kwargs.get(k, d) for k, d in (("image_column", "image"), ("caption_column", "captions")))
    if next(scan(source, *columns, kwargs.get("image_root", "")), None) is None:  # before the model loads
        raise UserError(
            f"Source '{source}' holds no pairs; point SOURCE at a table, shards or captioned images."
        )
    fp = checkpoint_fingerprint(checkpoint)  # a folder that is no checkpoint: one sentence
    towers = Towers.of_checkpoint(checkpoint, device)
    lookup = embeddings_lookup(embeddings, fp, str(source)) if embeddings else None
    return score_source(
        towers,
        source,
        out,
        fingerprint={"checkpoint": fp},
        lookup=lookup,
        extra_manifest={
            "source": source_name(source),
            "checkpoint": str(Path(checkpoint).expanduser().resolve()),
            "image_embeddings": str(embeddings) if embeddings else None,
            "score": "cosine similarity of the L2-normalised image and caption embeddings (DataComp's CLIP score)",
        },
        **kwargs,
    )
