"""Writing curated pairs (`lipkit data score | filter`), in the form the source had, so that the result
trains as it is (`data.train` pointing at it) from any working directory:

- images that are files (tables, folders of images, parquet or Hugging Face rows naming paths): a JSONL
  table, one row per pair, the image as an absolute path, the captions as a list;
- images stored inline (WebDataset shards, parquet bytes, a saved Hugging Face dataset's bytes): WebDataset
  shards in `shards/` (`lipkit data convert`'s writer: the image bytes as they were, the captions, the key
  and every field in each sample's JSON).

The form is chosen by the first pair written. Every metadata column of the source is kept, the given
fields (`clip_score`, ...) are added, and every row carries the record's `key`: keys stay the same
through score → filter, and match those `lipkit embed` and `lipkit data cluster` write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from lipkit.atomic import fsync_path, swap_dir
from lipkit.data.convert import image_bytes
from lipkit.data.records import Record, Skip
from lipkit.data.shard_writer import ShardOutput
from lipkit.errors import UserError

SHARDS = "shards"


class PairsOut:
    """Write pairs into `folder`: `folder/<table>` (JSONL) or `folder/shards/NNNNN.tar`; `close()` gives
    the name of what was written, relative to `folder` (None when nothing was)."""

    def __init__(
        self,
        folder: Path,
        table: str,
        image_column: str = "image",
        caption_column: str = "captions",
        shard_size: int = 1000,
    ) -> None:
        self.folder, self.table = Path(folder), table
        self.image_column, self.caption_column, self.shard_size = image_column, caption_column, shard_size
        self.inline: bool | None = None
        self.n = 0
        self._file: IO[str] | None = None
        self._shards: ShardOutput | None = None

    def _open(self, inline: bool) -> None:
        self.inline = inline
        if inline:
            self._shards = ShardOutput(self.folder / SHARDS, self.shard_size)
        else:
            self._file = (self.folder / self.table).open("x", encoding="utf-8")

    def write(self, record: Record, fields: dict[str, Any]) -> Skip | None:
        """Write one pair with `fields` added; a Skip when its image bytes cannot be read (shards)."""
        data = record.data  # read once: a lazy record fetches it on each access
        if self.inline is None:
            self._open(data is not None)
        if self._file is not None:
            if data is not None:
                raise UserError(
                    f"'{record.key}' holds its image inline while earlier rows name files; write the source "
                    "as shards with `lipkit data convert` first and use those."
                )
            row = {
                self.image_column: str(Path(record.image).resolve()),
                self.caption_column: record.captions,
                **record.meta,
                "key": record.key,
                **fields,
            }
            self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            got = image_bytes(record)
            if isinstance(got, Skip):
                return got
            meta = {k: v for k, v in {**record.meta, **fields}.items() if k != "key"}
            assert self._shards is not None
            self._shards.write(Record(record.image, record.captions, meta, key=record.key), *got)
        self.n += 1
        return None

    def close(self) -> str | None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            return self.table
        if self._shards is not None:
            self._shards.close()
            return SHARDS
        return None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._shards is not None:
            self._shards.writer.close()


def move_into(tmp: Path, out: Path) -> None:
    """Move what `tmp` holds (files and folders written there) into `out`, each entry replaced whole."""
    for entry in sorted(tmp.iterdir()):
        if entry.is_dir():
            swap_dir(entry, out / entry.name)
        else:
            fsync_path(entry)
            os.replace(entry, out / entry.name)
    fsync_path(out)


def source_name(source: str | Path) -> str:
    """A source as a manifest names it: a local path made absolute; a pattern or pipe: URL as given."""
    s = str(source)
    return s if s.startswith("pipe:") or "://" in s else str(Path(s).expanduser().absolute())


def source_inside(source: str | Path, out: Path) -> bool:
    """True when the source (a path, not a pipe: URL) is `out`, lies under it, or is a folder holding it."""
    s = str(source)
    if s.startswith("pipe:") or "{" in s or "::" in s:
        s = s.split("::")[0].split("{")[0]
        if s.startswith("pipe:"):
            return False
    src, dest = Path(s).expanduser().resolve(), out.expanduser().resolve()
    return src == dest or dest in src.parents or (src.is_dir() and src in dest.parents)


def write_pairs(
    out: Path,
    table: str,
    pairs: Iterable[tuple[Record, dict[str, Any]]],
    image_column: str,
    caption_column: str,
) -> tuple[str | None, int, list[Skip]]:
    """Write `pairs` (a record and the fields to add) with `PairsOut` into a temporary folder inside
    `out`, then move the result into `out` whole (the other form's old output is removed); (what was
    written, how many, the pairs whose image bytes could not be read)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".write-*"):  # the output of a run that was killed before it finished
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".write-", dir=out))
    writer = PairsOut(tmp, table, image_column, caption_column)
    skipped: list[Skip] = []
    try:
        for record, fields in pairs:
            if (skip := writer.write(record, fields)) is not None:
                skipped.append(skip)
        name = writer.close()
        for stale in {table, SHARDS} - {name}:
            target = out / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        move_into(tmp, out)
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return name, writer.n, skipped
