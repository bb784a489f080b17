"""Batches for training and evaluation, from whatever `data.train` names: deterministic epochs, exact
resume, skip-and-count.

  table_batches.py  tables, parquet and folders (`TrainBatches`), and `ImageStore` for evaluation
  shard_batches.py  WebDataset shards, streamed (`ShardBatches`)
  batching.py       what both share (caption choice, skip counting, the data lines of metrics.jsonl)

This module picks one from a config (`open_train_data`) and re-exports the names callers use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lipkit.data.batching import Batch, Log, SkipCounter, choose_captions
from lipkit.data.shard_batches import ShardBatches
from lipkit.data.shards import expand_shards, shard_captions
from lipkit.data.sources import Record, describe, read_records, source_kind
from lipkit.data.table_batches import ImageStore, TrainBatches

__all__ = [
    "Batch",
    "ImageStore",
    "Log",
    "ShardBatches",
    "SkipCounter",
    "TrainBatches",
    "TrainData",
    "choose_captions",
    "jsonl_log",
    "open_train_data",
    "skip_summary",
]


@dataclass
class TrainData:
    """The training source of a config, opened (records read, or shards listed) but not decoded."""

    kind: str
    records: list[Record] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    read_skipped: Counter[str] = field(default_factory=Counter)
    cfg: Any = None

    def captions(self) -> Iterator[str]:
        """Every training caption (for a tokenizer)."""
        if self.kind == "shards":
            return shard_captions(self.urls, self.cfg.caption_column)
        return (c for r in self.records for c in r.captions)

    def batches(
        self, size: int, batch_size: int, seed: int, log: Log | None = None
    ) -> TrainBatches | ShardBatches:
        d = self.cfg
        if self.kind == "shards":
            return ShardBatches(
                self.urls,
                size,
                batch_size,
                seed,
                d.caption_policy,
                d.captions_per_image,
                d.workers,
                samples_per_epoch=d.samples_per_epoch,
                shuffle_buffer=d.shuffle_buffer,
                max_skip_fraction=d.max_skip_fraction,
                caption_column=d.caption_column,
                langs=getattr(d, "caption_langs", []),
                select=getattr(d, "caption_select", []),
                meta_captions=getattr(d, "meta_captions", []),
                log=log,
            )
        return TrainBatches(
            self.records,
            size,
            batch_size,
            seed,
            d.caption_policy,
            d.captions_per_image,
            d.cache_images,
            d.workers,
            max_skip_fraction=d.max_skip_fraction,
            read_skipped=self.read_skipped,
            log=log,
        )


def open_train_data(d: Any) -> TrainData:
    """The training source named by `d.train` (a DataConfig): a table, parquet, a folder or shards."""
    kind = source_kind(d.train)
    if kind == "shards":
        return TrainData(kind, urls=expand_shards(d.train), cfg=d)
    records, skipped = read_records(d.train, d.image_column, d.caption_column, d.image_root)
    meta = getattr(d, "meta_captions", [])
    if getattr(d, "caption_langs", None) or getattr(d, "caption_select", None) or meta:
        from lipkit.data.captions import add_meta_captions_checked, check_meta_templates, filter_captions

        check_meta_templates(meta)
        records = filter_captions(records, getattr(d, "caption_select", []), getattr(d, "caption_langs", []))
        records = add_meta_captions_checked(records, meta, d.train)
    return TrainData(kind, records=records, read_skipped=skipped, cfg=d)


def jsonl_log(path: Any) -> Log:
    """A `log` callback that appends one JSON line per record to `path` (e.g. a run's metrics.jsonl)."""
    import json
    from pathlib import Path

    def log(record: dict[str, Any]) -> None:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    return log


def skip_summary(skipped: Counter[str] | dict[str, int]) -> str:
    """One line for the end of a run: what was skipped, by reason."""
    total = sum(skipped.values())
    return (
        f"data: skipped {total} samples ({describe(skipped)}); `lipkit data validate` lists them"
        if total
        else ""
    )
