"""Every source kind, and the one place that picks a kind from a path (`source_kind`), so that one
config key (`data.train`) serves all of them:

- `table`: CSV / TSV / JSONL naming one image per row and its captions (sources/table.py);
- `parquet`: a `.parquet` file or a folder of them, images as bytes, paths or `{bytes, path}` structs
  (sources/parquet.py);
- `shards`: WebDataset `.tar` files, a brace pattern (`shards/{00000..00099}.tar`), a folder of
  `.tar` files or `pipe:` URLs, in the img2dataset layout (sources/shards.py);
- `folder`: a folder of images with sidecar captions, `cat.jpg` + `cat.txt` or `cat.json`
  (sources/folder.py).

Every column other than image and captions is kept as metadata (class labels for zero-shot evaluation,
`langs` for language filtering). A record's `key` names it the same way in every format: the `key`
column or field when there is one, else the image's path (a shard written by `lipkit data convert`
keeps the key of the row it came from).

Adding a kind: a module with `detect(src, path)`, `scan(src, image_column, caption_column, image_root)`
and, when cheap, `count(src)`; then one `SourceKind` line in `KINDS` (before any kind it must win
over). Its training batches come from `open_train`: `open_records` (read into memory, decoded by
workers, data/table_batches.py) or `open_shards` (streamed, data/shard_batches.py).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipkit.data.records import Record, Skip, collect, describe
from lipkit.data.shard_batches import open_shards
from lipkit.data.sources import folder, parquet, shards, table
from lipkit.data.table_batches import open_records
from lipkit.errors import UserError

Scanner = Callable[[str | Path, str, str, str | Path], Iterator[Record | Skip]]


@dataclass(frozen=True)
class SourceKind:
    name: str
    detect: Callable[[str, Path], bool]  # (the source as written, its expanded path) → is it this kind
    scan: Scanner  # every sample as a Record (image not decoded) or a Skip
    open_train: Callable[[Any, Scanner], Any]  # (DataConfig, scan) → training data with .batches()
    count: Callable[[str | Path], int | None] | None = None  # samples, when that is cheap to know
    images_only: Callable[[str | Path], list[Record]] | None = None  # records without captions (embed)


# Detection order: the first kind whose detect() accepts the source wins.
KINDS: list[SourceKind] = [
    SourceKind("shards", shards.is_shards, shards.scan_shards, open_shards, shards.known_count),
    SourceKind("parquet", parquet.is_parquet, parquet.scan_parquet, open_records, parquet.count_rows),
    SourceKind("table", table.is_table, table.scan_table, open_records, table.count_rows),
    SourceKind("folder", folder.is_folder, folder.scan_folder, open_records, None, folder.images_only),
]


def source_kind(src: str | Path) -> SourceKind:
    """The kind of a source, from its name (and a folder's contents)."""
    s = str(src)
    path = Path(s).expanduser()
    if "://" in s and not shards.names_shards(s):
        raise UserError(f"Data source '{s}' is a URL; stream it with a pipe: URL such as 'pipe:curl -s {s}'.")
    for kind in KINDS:
        if kind.detect(s, path):
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


def open_train_data(d: Any) -> Any:
    """The training data named by `d.train` (a DataConfig), opened (records read, or shards listed) but
    not decoded: `.captions()` for a tokenizer, `.batches(size, batch_size, seed, log)` for training."""
    kind = source_kind(d.train)
    return kind.open_train(d, kind.scan)
