"""Every source kind, and the one place that picks a kind from a path (`source_kind`), so that one
config key (`data.train`) serves all of them:

- `table`: CSV / TSV / JSONL naming one image per row and its captions (sources/table.py);
- `parquet`: a `.parquet` file or a folder of them, images as bytes, paths or `{bytes, path}` structs
  (sources/parquet.py);
- `shards`: WebDataset `.tar` files, a brace pattern (`shards/{00000..00099}.tar`), a folder of
  `.tar` files or `pipe:` URLs, in the img2dataset layout (sources/shards.py);
- `hf_disk`: a Hugging Face dataset saved with `save_to_disk` (state.json + data-*.arrow), or one split
  of a saved DatasetDict (`dict/train`); memory-mapped, images read when decoded (sources/hf_disk.py);
- `folder`: a folder of images with sidecar captions, `cat.jpg` + `cat.txt` or `cat.json`
  (sources/folder.py);
- `class_folders`: one sub-folder of images per class, as torchvision's ImageFolder (evaluation sets;
  sources/class_folders.py);
- `benchmark_shards`: CLIP_benchmark's WebDataset evaluation sets (`cls`/`txt` members, classnames.txt,
  nshards.txt; sources/benchmark_shards.py).

These two, and `hf_disk` for its ClassLabel columns, name their classes themselves (every class in
order, and the set's prompt templates):
`eval_labels(src)` gives them to evaluation (data/label_sets.py).

Every column other than image and captions is kept as metadata (class labels for zero-shot evaluation,
`langs` for language filtering). A record's `key` names it the same way in every format: the `key`
column or field when there is one, else the image's path (a shard written by `lipkit data convert`
keeps the key of the row it came from).

Adding a kind: a module with `scan(src, image_column, caption_column, image_root)`, a test of a name
and/or of a folder's contents, and, when cheap, `count(src)`; then one `SourceKind` entry in `KINDS`
(before any kind it must win over). Its training batches come from `open_train`: `open_records` with
its scanner (read into memory, decoded by workers, data/table_batches.py) or `open_shards` (streamed,
data/shard_batches.py).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lipkit.data.label_sets import LabelSet
from lipkit.data.records import Record, Skip, collect, describe
from lipkit.data.shard_batches import open_shards
from lipkit.data.sources import benchmark_shards, class_folders, folder, hf_disk, parquet, shards, table
from lipkit.data.table_batches import open_records
from lipkit.errors import UserError

Scanner = Callable[[str | Path, str, str, str | Path], Iterator[Record | Skip]]


@dataclass(frozen=True)
class SourceKind:
    name: str
    named: Callable[[str], bool]  # is a source with this name (suffix, pattern, scheme) of this kind
    holds: Callable[[Path], bool] | None  # is a folder with these contents of this kind
    scan: Scanner  # every sample as a Record (image not decoded) or a Skip
    open_train: Callable[[Any], Any]  # DataConfig → training data with .captions() and .batches()
    count: Callable[[str | Path], int | None] | None = None  # samples, when that is cheap to know
    images_only: Callable[[str | Path], list[Record]] | None = None  # records without captions (embed)
    # the classes and prompts of a set that names them itself (data/label_sets.py), by metadata column
    label_sets: Callable[[str | Path], dict[str, LabelSet]] | None = None


# A source is of the first kind that claims its name; a folder with no such name, of the first kind that
# claims its contents (a folder holding both parquet and tar files is parquet); anything else is a table.
KINDS: list[SourceKind] = [
    SourceKind(
        "benchmark_shards",
        lambda src: False,
        benchmark_shards.holds_benchmark_shards,
        benchmark_shards.scan_benchmark_shards,
        partial(open_records, scan=benchmark_shards.scan_benchmark_shards),
        label_sets=benchmark_shards.label_sets,
    ),
    SourceKind(
        "parquet",
        parquet.names_parquet,
        parquet.holds_parquet,
        parquet.scan_parquet,
        partial(open_records, scan=parquet.scan_parquet),
        parquet.count_rows,
    ),
    SourceKind(
        "shards",
        shards.names_shards,
        shards.holds_shards,
        shards.scan_shards,
        open_shards,
        shards.known_count,
    ),
    SourceKind(
        "table",
        table.names_table,
        None,
        table.scan_table,
        partial(open_records, scan=table.scan_table),
        table.count_rows,
    ),
    SourceKind(
        "hf_disk",
        lambda src: False,
        hf_disk.holds_hf_disk,
        hf_disk.scan_hf_disk,
        partial(open_records, scan=hf_disk.scan_hf_disk),
        hf_disk.count_rows,
        label_sets=hf_disk.label_sets,
    ),
    SourceKind(
        "class_folders",
        lambda src: False,
        class_folders.holds_classes,
        class_folders.scan_class_folders,
        partial(open_records, scan=class_folders.scan_class_folders),
        images_only=class_folders.images_only,
        label_sets=class_folders.label_sets,
    ),
    SourceKind(
        "folder",
        lambda src: False,
        folder.holds_images,
        folder.scan_folder,
        partial(open_records, scan=folder.scan_folder),
        None,
        folder.images_only,
    ),
]


def source_kind(src: str | Path) -> SourceKind:
    """The kind of a source, from its name, else (for a folder) from its contents."""
    s = str(src)
    if shards.names_shards(s):  # checked first: a pattern or pipe: URL may end in anything
        return next(k for k in KINDS if k.name == "shards")
    if "://" in s:
        raise UserError(f"Data source '{s}' is a URL; stream it with a pipe: URL such as 'pipe:curl -s {s}'.")
    for kind in KINDS:
        if kind.named(s):
            return kind
    path = Path(s).expanduser()
    if path.is_dir():
        for kind in KINDS:
            if kind.holds is not None and kind.holds(path):
                return kind
    return next(k for k in KINDS if k.name == "table")  # scan_table names the missing file or the extension


def scan(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every sample of any source kind, as Records (image not decoded) and Skips."""
    return source_kind(src).scan(src, image_column, caption_column, image_root)


def estimate_total(src: str | Path) -> int | None:
    """Samples in a source when that is cheap to know, else None (only for a progress bar)."""
    try:
        kind = source_kind(src)
        return kind.count(src) if kind.count else None
    except Exception:  # noqa: BLE001 - only an estimate for a progress bar
        return None


def read_records(
    src: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> tuple[list[Record], Counter[str]]:
    """All usable records of a source (any kind) and the count of skipped rows by reason."""
    return collect(scan(src, image_column, caption_column, image_root))


def read_table(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> list[Record]:
    """Read a captions table (or any other source kind) into records; unusable rows are skipped with a
    warning that counts them by reason."""
    records, skipped = read_records(path, image_column, caption_column, image_root)
    if skipped:
        warnings.warn(f"{path}: skipped {sum(skipped.values())} rows ({describe(skipped)}).", stacklevel=2)
    return records


def eval_labels(src: str | Path) -> dict[str, LabelSet]:
    """The classes and prompt templates a source names itself, by metadata column ({} for most kinds:
    their classes are the values found in `eval.class_columns`)."""
    kind = source_kind(src)
    return kind.label_sets(src) if kind.label_sets else {}


def open_train_data(d: Any) -> Any:
    """The training data named by `d.train` (a DataConfig), opened (records read, or shards listed) but
    not decoded: `.captions()` for a tokenizer, `.batches(size, batch_size, seed, log)` for training."""
    return source_kind(d.train).open_train(d)
