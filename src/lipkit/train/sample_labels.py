"""Per-sample class labels by record key, for objectives that classify samples: MLCD's clusters, read from
a `lipkit data cluster` folder (`data.cluster_labels`), or the table columns an objective names (PLIP's
identity and attribute columns, `SampleLabels.from_records`); looked up by
the stable sample ids the trainer makes from the batch's record keys (train.inputs.sample_ids), so tables
and shards, every rank and every resume see the same labels for the same sample.

Each sample has L labels (its `labels` list — `lipkit data cluster --labels L` writes the L nearest
clusters — or its one `cluster`); a sample the clustering does not list (an image that could not be
decoded then, or a key of another table) gets −1, which objectives read as "no label".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.train.inputs import sample_ids


class SampleLabels:
    """Sorted sample ids and their (n, L) labels (−1 pads), `num_classes` classes."""

    def __init__(self, keys: list[str], labels: list[list[int]], num_classes: int) -> None:
        unique: dict[str, list[int]] = {}
        for key, row in zip(keys, labels, strict=True):  # the same image listed twice: one entry
            if unique.setdefault(key, row) != row:
                raise UserError(
                    f"The labels give the key '{key}' two different label lists; give every row a unique `key` "
                    "(and with data.cluster_labels run `lipkit data cluster` again)."
                )
        width = max([1, *(len(x) for x in unique.values())])
        table = np.full((len(unique), width), -1, dtype=np.int64)
        for i, row in enumerate(unique.values()):
            table[i, : len(row)] = row
        ids = sample_ids(list(unique))
        order = ids.argsort()
        self.ids, self.labels, self.num_classes = ids[order], torch.from_numpy(table)[order], num_classes
        self.keys = set(unique)
        self.classes: list[list[str]] = []  # from_records: each column's values
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copies per device, made once

    @classmethod
    def from_clusters(cls, folder: str | Path) -> SampleLabels:
        """The labels of a finished `lipkit data cluster` folder (its cluster.json is written last)."""
        path = Path(folder).expanduser()
        if not (path / "cluster.json").is_file() or not (path / "clusters.jsonl").is_file():
            raise UserError(
                f"data.cluster_labels: '{folder}' is not a finished `lipkit data cluster` folder (no cluster.json); "
                "run `lipkit data cluster CHECKPOINT SOURCE OUT -k K --labels L` first."
            )
        keys, labels = [], []
        try:
            k = int(json.loads((path / "cluster.json").read_text(encoding="utf-8"))["k"])
            with (path / "clusters.jsonl").open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        keys.append(str(row["key"]))
                        labels.append([int(c) for c in row.get("labels", [row["cluster"]])])
                        if not all(0 <= c < k for c in labels[-1]):
                            raise ValueError(f"line {n} has a cluster outside 0 … {k - 1}")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"data.cluster_labels: '{folder}' is damaged ({e}); run `lipkit data cluster` again."
            ) from e
        return cls(keys, labels, k)

    @classmethod
    def from_records(cls, records: Sequence[Record], columns: Sequence[str], where: str) -> SampleLabels:
        """(n, C) class indices of each record's value in each of `columns` (−1 where a row has none: no
        value, "", NaN); `classes[c]` lists column c's values, sorted. Rows repeating a key (one image, one
        row per caption) merge; a column they disagree on is refused."""
        values = [[_value(r.meta.get(c)) for c in columns] for r in records]
        missing = [c for j, c in enumerate(columns) if all(v[j] is None for v in values)]
        if missing:
            raise UserError(
                f"No row of {where} has the column(s) {', '.join(map(repr, missing))} the objective reads; "
                "add them to the table or change the objective's options."
            )
        merged: dict[str, list[str | None]] = {}
        for r, row in zip(records, values, strict=True):
            have = merged.setdefault(r.key, list(row))
            for j, v in enumerate(row):
                if v is not None and have[j] not in (None, v):
                    raise UserError(
                        f"Rows of {where} with the key '{r.key}' give column '{columns[j]}' two values "
                        f"({have[j]!r}, {v!r}); make them agree, or give the rows distinct keys."
                    )
                have[j] = have[j] if v is None else v
        classes = [
            sorted({row[j] for row in merged.values() if row[j] is not None}) for j in range(len(columns))
        ]
        index = [{v: i for i, v in enumerate(vs)} for vs in classes]
        rows = [[-1 if v is None else index[j][v] for j, v in enumerate(row)] for row in merged.values()]
        made = cls(list(merged), rows, 0)
        made.classes = classes
        return made

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) labels of these sample ids, −1 for ids the table does not hold."""
        if ids.device not in self._on:
            self._on[ids.device] = (self.ids.to(ids.device), self.labels.to(ids.device))
        table_ids, labels = self._on[ids.device]
        if table_ids.numel() == 0:
            return torch.full((len(ids), labels.shape[1]), -1, dtype=torch.int64, device=ids.device)
        pos = torch.searchsorted(table_ids, ids).clamp(max=len(table_ids) - 1)
        found = table_ids[pos] == ids
        return torch.where(found[:, None], labels[pos], torch.full_like(labels[pos], -1))

    def check_covers(self, keys: list[str], where: str) -> float:
        """The share of `keys` (a training table's) that have labels; none at all is refused."""
        share = sum(k in self.keys for k in keys) / max(1, len(keys))
        if keys and share == 0:
            raise UserError(
                f"None of the {len(keys)} samples of {where} has cluster labels: the keys differ (a table without a "
                "`key` column is keyed by its image paths as written); cluster this same table, read the same way."
            )
        return share


def _value(v: object) -> str | None:
    """A column value as a class name: None, "" and NaN are missing; 3.0 is "3"."""
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
