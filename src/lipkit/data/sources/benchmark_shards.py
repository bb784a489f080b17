"""CLIP_benchmark's WebDataset evaluation sets (`clip_benchmark_export_wds`, and the sets LAION
publishes in that layout):

    root/classnames.txt                             class names, one per line, in `cls` order
    root/zeroshot_classification_templates.txt      prompts, `{c}` for the class name (optional)
    root/dataset_type.txt                           "classification" (default) or "retrieval"
    root/test/nshards.txt                           N; the shards are root/test/0.tar … N-1.tar

A classification sample holds an image (`webp`, `png`, `jpg` or `jpeg`) and `cls` (the class index as
text): a record without captions whose metadata column `class` holds the class name. A retrieval
sample holds an image and `txt`, its captions one per line. Point a source at `root` (its `test`
split, or its only split) or at a split folder. Multi-label sets (`npy` labels) are not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lipkit.data.label_sets import CLASS_COLUMN, INDEX_SUFFIX, LabelSet, read_label_set, read_lines
from lipkit.data.records import Record, Skip
from lipkit.data.sources.shards import ShardStatus, read_shard
from lipkit.errors import UserError

NSHARDS = "nshards.txt"
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order


def _is_split(d: Path) -> bool:
    return (d / NSHARDS).is_file()


def holds_benchmark_shards(folder: Path) -> bool:
    """A split folder (nshards.txt) or a root with at least one split folder (one directory listing:
    this test runs first for every folder source, of any size)."""
    if _is_split(folder):
        return True
    with os.scandir(folder) as entries:
        return any(e.is_dir() and _is_split(Path(e.path)) for e in entries)


def split_dirs(src: str | Path) -> tuple[Path, Path]:
    """(root, split folder) of a set named by its root or one of its splits."""
    p = Path(src).expanduser().resolve()
    if _is_split(p):
        return p.parent, p
    splits = sorted(d for d in p.iterdir() if d.is_dir() and _is_split(d))
    if len(splits) == 1:
        return p, splits[0]
    if p / "test" in splits:
        return p, p / "test"
    names = ", ".join(d.name for d in splits) or "none"
    raise UserError(
        f"The evaluation set '{p}' has the splits {names}; point at one of them, e.g. '{p / 'test'}'."
    )


def dataset_type(root: Path) -> str:
    path = root / "dataset_type.txt"
    kind = (read_lines(path) or ["classification"])[0].lower() if path.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise UserError(
            f"'{path}' says '{kind}'; lipkit reads classification and retrieval sets (multi-label sets are not supported)."
        )
    return kind


def label_sets(src: str | Path) -> dict[str, LabelSet]:
    root, _ = split_dirs(src)
    if dataset_type(root) != "classification":
        return {}
    if not (root / "classnames.txt").is_file():
        raise UserError(
            f"The classification set '{root}' has no classnames.txt; add one class name per line, in `cls` order."
        )
    return {CLASS_COLUMN: read_label_set(root, [], f"the evaluation set '{root}'")}


def shard_urls(split: Path) -> list[str]:
    try:
        n = int(read_lines(split / NSHARDS)[0])
    except (IndexError, ValueError) as e:
        raise UserError(
            f"'{split / NSHARDS}' must hold the number of shards; write it as one integer."
        ) from e
    return [str(split / f"{i}.tar") for i in range(n)]


def _record(sample: dict, url: str, classes: list[str] | None) -> Record | Skip:
    key = str(sample.get("__key__", ""))
    ext = next((e for e in IMAGE_KEYS if e in sample), None)
    if ext is None:
        return Skip("no_image", key, f"no {'/'.join(IMAGE_KEYS)} member")
    if classes is None:  # retrieval: the captions, one per line, as CLIP_benchmark splits them
        text = sample.get("txt", b"").decode("utf-8", errors="replace")
        captions = [c.strip() for c in text.splitlines() if c.strip()]
        if not captions:
            return Skip("no_caption", key, "no txt member")
        return Record(Path(url), captions, {}, key=key, data=sample[ext])
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (KeyError, UnicodeDecodeError, ValueError):
        return Skip("no_label", key, "no cls member with a class index")
    if not 0 <= label < len(classes):
        raise UserError(
            f"Sample '{key}' of '{url}' has class {label} but classnames.txt names {len(classes)}; "
            "fix the labels or the class names."
        )
    meta = {CLASS_COLUMN: classes[label], CLASS_COLUMN + INDEX_SUFFIX: label}
    return Record(Path(url), [], meta, key=key, data=sample[ext])


def scan_benchmark_shards(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every sample of the split's shards in order (the columns and image root do not apply), then a
    Skip for each damaged shard."""
    _, split = split_dirs(src)
    labels = label_sets(split)
    classes = labels[CLASS_COLUMN].classes if labels else None
    for url in shard_urls(split):
        status = ShardStatus(url)
        for sample in read_shard(url, status):
            yield _record(sample, url, classes)
        if status.reason:
            yield status.skip()
