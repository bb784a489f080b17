"""Parquet sources: a `.parquet` file or a folder of them, read one row group at a time; the image column
holds encoded bytes, a path (relative to the image root, by default the file's folder) or a Hugging
Face style struct `{bytes, path}` (see data/records.py for the record model). A `frames` column makes a row
a clip: a list of such images, or a video's bytes or path (data/frames.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lipkit.data.frames import FRAMES, frames_of
from lipkit.data.records import Record, Skip, caption_record
from lipkit.errors import UserError


def names_parquet(src: str) -> bool:
    return src.lower().endswith(".parquet")


def holds_parquet(folder: Path) -> bool:
    return next(folder.glob("*.parquet"), None) is not None


def count_rows(src: str | Path) -> int:
    """Rows of every file, from the parquet metadata (no data is read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(Path(src).expanduser()))


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise UserError(f"Folder '{path}' holds no .parquet files; point data.train at a parquet file.")
        return files
    if not path.is_file():
        raise UserError(f"Parquet file '{path}' does not exist; check data.train.")
    return [path]


def scan_parquet(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "captions",
    image_root: str | Path = "",
) -> Iterator[Record | Skip]:
    """Rows of a parquet file (or a folder of them), read one row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(
            "Reading parquet needs pyarrow; install it with `pip install 'lipkit[parquet]'`."
        ) from e
    p = Path(path).expanduser()
    for f in _parquet_files(p):
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types
            raise UserError(f"Parquet file '{f}' cannot be read ({e}); replace it or leave it out.") from e
        names = pf.schema_arrow.names
        for col in (image_column, caption_column):
            if col not in names and not (col == image_column and FRAMES in names):
                raise UserError(
                    f"Parquet file '{f}' has no column '{col}' (it has {sorted(names)}); "
                    "set data.image_column / data.caption_column to the right names."
                )
        root = Path(image_root).expanduser() if image_root else f.parent
        row = 0
        for batch in pf.iter_batches(batch_size=512):
            for values in batch.to_pylist():
                where = f"{f.name}:{row}"
                row += 1
                image = values.pop(image_column, None)
                captions = values.pop(caption_column, None)
                clip = values.pop(FRAMES, None)
                meta = {k: v for k, v in values.items() if not isinstance(v, bytes)}
                if clip not in (None, "", []):  # a clip or slice stack (data/frames.py)
                    yield _clip_record(f, root, clip, captions, meta, str(values.get("key") or where))
                    continue
                if isinstance(image, dict):  # Hugging Face datasets' Image feature
                    image = image.get("bytes") or image.get("path")
                if isinstance(image, bytes | bytearray):
                    key = str(values.get("key") or where)
                    yield caption_record(f, captions, meta, key, data=bytes(image))
                elif isinstance(image, str) and image.strip():
                    yield caption_record(root / image.strip(), captions, meta, str(values.get("key") or ""))
                else:
                    yield Skip("no_image", str(values.get("key") or where), "empty image cell")


def _clip_record(f: Path, root: Path, clip: object, captions: object, meta: dict, key: str) -> Record | Skip:
    """A row whose `frames` cell holds a list of images (bytes, paths or `{bytes, path}`) or a video."""
    frames = frames_of(clip, root)
    if frames is None:
        return Skip("bad_row", key, f"'{FRAMES}' is not a list of images or a video")
    record = caption_record(frames.video if isinstance(frames.video, Path) else f, captions, meta, key)
    if isinstance(record, Record):
        record.frames = frames
    return record
