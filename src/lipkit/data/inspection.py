"""What `lipkit data inspect | validate` do (the CLI only parses and prints).

- `inspect`: counts and histograms without decoding any image (image sizes come from the headers), and
  the histogram of `clip_score` when the source has one (`lipkit data score`'s output).
- `validate`: decodes every image exactly as training does and lists what is broken, by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path

from lipkit.data.batching import decode_record
from lipkit.data.frames import video_member
from lipkit.data.images import classify_failure, open_image
from lipkit.data.records import Record, Skip
from lipkit.data.scan_report import Report, run_pass
from lipkit.data.sources.registry import estimate_total, scan, source_kind

CAPTION_WORD_BINS = [1, 2, 3, 5, 9, 17, 33, 65]
IMAGE_SIDE_BINS = [1, 32, 64, 128, 256, 512, 1024, 2048]
CAPTIONS_PER_SAMPLE_BINS = [0, 1, 2, 3, 5, 9, 17]  # 0: class folders, label sets


def _bin(value: int, edges: list[int]) -> str:
    for lo, hi in zip(edges, edges[1:], strict=False):
        if value < hi:
            return f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}"
    return f"{edges[-1]}+"


def _ordered(c: Counter[str], edges: list[int]) -> dict[str, int]:
    names = [_bin(e, edges) for e in edges]
    return {k: c[k] for k in names if c[k]}


def score_histogram(values: list[float], bins: int = 10) -> dict[str, int]:
    """Counts in `bins` equal-width bins from the lowest value to the highest ("lo–hi" labels)."""
    import numpy as np

    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {f"{lo:.3f}–{hi:.3f}": int(n) for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True)}


def inspect(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    limit: int = 0,
    progress: bool = True,
) -> Report:
    """Counts and histograms (caption words, captions per sample, image shorter side, formats, languages)."""
    words: Counter[str] = Counter()
    per_sample: Counter[str] = Counter()
    sides: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    langs: Counter[str] = Counter()
    clip_scores: list[float] = []  # a scored source's (`lipkit data score`) best score per pair
    captions = 0

    def work(record: Record) -> Skip | None:
        nonlocal captions
        captions += len(record.captions)
        per_sample[_bin(len(record.captions), CAPTIONS_PER_SAMPLE_BINS)] += 1
        for c in record.captions:
            words[_bin(len(c.split()), CAPTION_WORD_BINS)] += 1
        score = record.meta.get("clip_score")
        if isinstance(score, int | float) and not isinstance(score, bool):
            clip_scores.append(float(score))
        tags = record.meta.get("langs")
        if isinstance(tags, list):
            langs.update(str(t) for t in tags)
        elif isinstance(tags, str) and tags:
            langs[tags] += 1
        if record.frames is not None and record.frames.video is not None:
            return _video_format(record, formats)
        source = record.source
        try:
            with open_image(source) as im:  # the header only
                formats[str(im.format)] += 1
                sides[_bin(min(im.size), IMAGE_SIDE_BINS)] += 1
        except Exception as e:  # noqa: BLE001 - damaged headers raise many types; each is classified
            reason, detail = classify_failure(e, source)
            return Skip(reason, record.key, detail)
        return None

    items: Iterator[Record | Skip] = scan(src, image_column, caption_column, image_root)
    if limit:
        items = (x for i, x in zip(range(limit), items, strict=False))
    total = estimate_total(src)
    report = run_pass(
        items, "inspect", min(total, limit) if total and limit else total, progress, work, Report()
    )
    report.extra = {
        "kind": source_kind(src).name,
        "captions": captions,
        "captions_per_sample": _ordered(per_sample, CAPTIONS_PER_SAMPLE_BINS),
        "caption_words": _ordered(words, CAPTION_WORD_BINS),
        "image_shorter_side": _ordered(sides, IMAGE_SIDE_BINS),
        "image_formats": dict(formats.most_common()),
        "languages": dict(langs.most_common()),
    }
    if clip_scores:
        v = sorted(clip_scores)
        stats = {"n": len(v), "min": v[0], "median": v[len(v) // 2], "max": v[-1]}
        report.extra["clip_score"] = {**stats, "histogram": score_histogram(v)}
    return report


def _video_format(record: Record, formats: Counter[str]) -> Skip | None:
    """Count a video clip's container by its first bytes (its frames are decoded by `validate`)."""
    video = record.frames.video
    try:
        if isinstance(video, bytes):
            head = video[:16]
        else:
            with open(video, "rb") as f:
                head = f.read(16)
    except OSError as e:
        reason, detail = classify_failure(e, str(video))
        return Skip(reason, record.key, detail)
    ext = video_member(video, head)
    if ext is None:
        return Skip("broken_video", record.key, "not an MP4, MOV, WebM, MKV or AVI file")
    formats[ext.upper()] += 1
    return None


def _check(args: tuple[Record, int]) -> Skip | None:
    record, size = args
    _, reason, detail = decode_record(record, size)  # an image, or every chosen frame of a clip
    return Skip(reason, record.key, detail) if reason else None


def validate(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
    size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> Report:
    """Read every sample and decode every image as training would; the report counts what is broken."""
    items = scan(src, image_column, caption_column, image_root)
    total = estimate_total(src)
    if workers <= 0:
        return run_pass(items, "validate", total, progress, lambda r: _check((r, size)), Report())
    # decode in a process pool, in order: skips from reading pass through as they are
    with get_context("fork").Pool(workers) as pool:
        results = pool.imap(_passthrough, ((x, size) for x in items), chunksize=16)
        return run_pass(results, "validate", total, progress, lambda r: None, Report())


def _passthrough(args: tuple[Record | Skip, int]) -> Record | Skip:
    item, size = args
    if isinstance(item, Skip):
        return item
    return _check((item, size)) or item
