"""Hugging Face `datasets` saved to disk (`Dataset.save_to_disk`): a folder holding `state.json`,
`dataset_info.json` and the Arrow IPC stream files `data-*.arrow` that `state.json` lists, read with
pyarrow alone (the `parquet` extra), without importing `datasets`. A `DatasetDict` folder
(`dataset_dict.json`, one sub-folder per split) is named by its split: `path/to/dict/train`.

The image column holds a `datasets.Image` struct `{bytes, path}`, encoded bytes or a path (relative to
the image root, by default the dataset's folder); the caption column a string or a list of strings. A
dataset without the caption column (the usual classification set: an image and a `ClassLabel`) gives
records without captions: zero-shot evaluation and `lipkit embed` need none. Every other column is
metadata, a `ClassLabel` as its class name in `meta[column]` and its class index in
`meta[f"{column}_index"]` (a list of them as a list of names); `label_sets` gives evaluation every
class of each `ClassLabel`, in index order, also those without a row in the split.

The Arrow files are memory-mapped, never read whole: scanning reads captions and metadata into the
records, and each image stays in its file as a reference (`ArrowRecord`: file, column, row) that
`Record.data` resolves when the image is decoded. A record is small and picklable; a process that
receives one (a DataLoader worker) maps the file itself on first use (`_column`, cached per process).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lipkit.data.label_sets import LabelSet
from lipkit.data.records import Record, Skip, caption_record
from lipkit.errors import UserError

STATE, INFO, DICT = "state.json", "dataset_info.json", "dataset_dict.json"


def holds_hf_disk(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / DICT).is_file() or ((folder / STATE).is_file() and (folder / INFO).is_file())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' cannot be read ({e}); save the dataset again with `save_to_disk`.") from e


def arrow_files(folder: Path) -> list[Path]:
    """The data files of a saved Dataset, in row order (a DatasetDict folder is a UserError naming its
    splits)."""
    if (folder / DICT).is_file() and not (folder / STATE).is_file():
        splits = _read_json(folder / DICT).get("splits") or sorted(
            p.name for p in folder.iterdir() if (p / STATE).is_file()
        )
        raise UserError(
            f"'{folder}' is a Hugging Face DatasetDict with the splits {', '.join(splits)}; "
            f"point at one split's folder instead, e.g. '{folder / (splits[0] if splits else 'train')}'."
        )
    if not (folder / STATE).is_file():
        raise UserError(
            f"'{folder}' is not a folder written by Hugging Face `save_to_disk` (it has no {STATE}); "
            "check the path."
        )
    files = [folder / f["filename"] for f in _read_json(folder / STATE).get("_data_files", [])]
    for f in files:
        if not f.is_file():
            raise UserError(f"Data file '{f}' of the saved dataset is missing; save the dataset again.")
    return files


@lru_cache(maxsize=1024)  # a mapping holds address space, not a file descriptor
def _table(file: str) -> Any:
    """An Arrow stream file as a table, memory-mapped: nothing is read until a cell is asked for. Cached
    per process (a forked worker inherits the mapping; a spawned one maps the file anew)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise UserError(
            "Reading a saved Hugging Face dataset needs pyarrow; install it with `pip install 'lipkit[parquet]'`."
        ) from e
    try:
        return pa.ipc.open_stream(pa.memory_map(file)).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"Arrow file '{file}' cannot be read ({e}); save the dataset again.") from e


_MAPPED: dict[str, int] = {}  # file -> its modification time when mapped


def _open(file: str) -> Any:
    """`_table(file)`, mapped anew when the file changed since (a dataset saved again in one process)."""
    stamp = Path(file).stat().st_mtime_ns
    if _MAPPED.setdefault(file, stamp) != stamp:
        _table.cache_clear()
        _column.cache_clear()
        _MAPPED[file] = stamp
    return _table(file)


@lru_cache(maxsize=1024)
def _column(file: str, column: str) -> tuple[list[Any], list[int]]:
    """A column's chunks and the row each chunk starts at."""
    chunks = _table(file).column(column).chunks
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + len(c))
    return chunks, starts


def read_cell(file: str, column: str, row: int) -> bytes | None:
    """The encoded image at `row` of `column` (a `{bytes, path}` struct or bytes) of an Arrow file."""
    chunks, starts = _column(file, column)
    i = bisect_right(starts, row) - 1
    cell = chunks[i][row - starts[i]]
    if hasattr(cell, "keys"):  # a StructScalar
        cell = cell["bytes"]
    return cell.as_py()


def _arrow_data(record: ArrowRecord) -> bytes | None:
    return read_cell(str(record.image), record.column, record.row)


@dataclass
class ArrowRecord(Record):
    """A Record whose encoded image stays in its memory-mapped Arrow file (`image`) at `row` of `column`
    until `data` is read. `data` is no __init__ argument, so `dataclasses.replace` (caption selection)
    copies the reference, not the bytes."""

    row: int = 0
    column: str = ""
    data: bytes | None = field(  # type: ignore[assignment]
        default=property(_arrow_data), init=False, repr=False, compare=False
    )


def _class_names(folder: Path, files: list[Path]) -> dict[str, tuple[list[str], bool]]:
    """Column -> (class names, whether the column holds a list of labels) for ClassLabel features."""
    info = _read_json(folder / INFO) if (folder / INFO).is_file() else {}
    features = info.get("features")
    if not isinstance(features, dict) and files:  # also kept in the Arrow schema's metadata
        meta = _table(str(files[0])).schema.metadata or {}
        raw = meta.get(b"huggingface")
        features = json.loads(raw).get("info", {}).get("features") if raw else None
    out: dict[str, tuple[list[str], bool]] = {}
    for name, feat in (features or {}).items():
        if not isinstance(feat, dict):
            continue
        inner = feat.get("feature")
        if feat.get("_type") == "ClassLabel":
            out[name] = (list(feat.get("names") or []), False)
        elif isinstance(inner, dict) and inner.get("_type") == "ClassLabel":  # List / Sequence of labels
            out[name] = (list(inner.get("names") or []), True)
    return out


def label_sets(src: str | Path) -> dict[str, LabelSet]:
    """Per ClassLabel column (one label per row, not a list): every class name in index order, and no
    templates of its own (evaluation uses `eval.templates`)."""
    folder = Path(src).expanduser()
    classes = _class_names(folder, arrow_files(folder))
    return {col: LabelSet(names) for col, (names, many) in classes.items() if names and not many}


def _index(names: list[str], value: Any) -> int | None:
    """A ClassLabel id as a class index (None: -1, no label)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names)
    return value if ok else None


def _label(names: list[str], value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        i = _index(names, value)
        return None if i is None else names[i]  # -1: no label
    return value


def _image_kind(file: Path, schema: Any, image_column: str) -> str:
    """How the image column stores images: "struct" ({bytes, path}), "bytes" or "path"."""
    import pyarrow as pa

    t = schema.field(image_column).type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    raise UserError(
        f"Column '{image_column}' of '{file}' holds {t}, not images; set data.image_column to a column "
        "of datasets.Image, bytes or paths."
    )


def _image_cells(images: Any, kind: str) -> tuple[list[int | None], list[str | None]]:
    """Per row of a batch's image column: the length of its inline bytes (None: none) and its path
    (None: none), read without copying any image."""
    import pyarrow.compute as pc

    if kind == "path":
        return [None] * len(images), images.to_pylist()
    if kind == "bytes":
        return pc.binary_length(images).to_pylist(), [None] * len(images)
    lengths = pc.binary_length(images.field("bytes")).to_pylist()
    paths = (
        images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else [None] * len(images)
    )
    valid = images.is_valid().to_pylist()  # a struct's fields are undefined where the struct is null
    return (
        [n if ok else None for n, ok in zip(lengths, valid, strict=True)],
        [p if ok else None for p, ok in zip(paths, valid, strict=True)],
    )


def scan_hf_disk(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Every row of a saved Dataset as a Record (inline images as references into the Arrow file) or a
    Skip; keys are the `key` column, else `<folder name>:<row>` (inline images) or the image path. Without
    a column `caption_column` every record has no captions (a classification set)."""
    folder = Path(path).expanduser()
    files = [f.resolve() for f in arrow_files(folder)]  # a reference holds the absolute path
    labels = _class_names(folder, files)
    name = folder.resolve().name
    root = Path(image_root).expanduser() if image_root else folder
    row = 0
    for f in files:
        table = _open(str(f))
        if image_column not in table.column_names:
            raise UserError(
                f"Saved dataset '{folder}' has no column '{image_column}' (it has "
                f"{sorted(table.column_names)}); set data.image_column to the column of images."
            )
        captioned = caption_column in table.column_names
        kind = _image_kind(f, table.schema, image_column)
        rest = [c for c in table.column_names if c != image_column]
        start = row
        for batch in table.to_batches():
            lengths, paths = _image_cells(batch.column(image_column), kind)
            for values, n, rel in zip(batch.select(rest).to_pylist(), lengths, paths, strict=True):
                captions = _named(values, labels, caption_column).pop(caption_column, None)
                meta = {k: v for k, v in values.items() if not isinstance(v, bytes)}
                key = str(values.get("key") or "")
                if n:  # inline bytes: a reference into the file
                    rec = _record(f, captions, captioned, meta, key or f"{name}:{row}")
                    yield (
                        ArrowRecord(
                            rec.image, rec.captions, meta, rec.key, row=row - start, column=image_column
                        )
                        if isinstance(rec, Record)
                        else rec
                    )
                elif isinstance(rel, str) and rel.strip():
                    yield _record(root / rel.strip(), captions, captioned, meta, key)
                else:
                    yield Skip("no_image", key or f"{name}:{row}", "empty image cell")
                row += 1


def _record(image: Path, captions: Any, captioned: bool, meta: dict[str, Any], key: str) -> Record | Skip:
    """A captioned record (`caption_record`: a Skip without a usable caption), or one without captions
    when the dataset has no caption column (not `captioned`)."""
    if not captioned:
        return Record(image, [], meta, key=key)
    return caption_record(image, captions, meta, key)


def _named(
    values: dict[str, Any], labels: dict[str, tuple[list[str], bool]], caption_column: str
) -> dict[str, Any]:
    """A row with its ClassLabel ids replaced by class names (in place), and each single label's id
    kept as `<column>_index` (not the caption column's: it is no metadata)."""
    for col, (names, many) in labels.items():
        if col in values:
            v = values[col]
            if many:
                values[col] = [_label(names, x) for x in v] if v else v
                continue
            values[col] = _label(names, v)
            if col != caption_column:
                values[f"{col}_index"] = _index(names, v)
    return values


def count_rows(src: str | Path) -> int:
    """Rows of a saved Dataset, from its Arrow files' batch headers (no image is read)."""
    return sum(_open(str(f)).num_rows for f in arrow_files(Path(src).expanduser()))
