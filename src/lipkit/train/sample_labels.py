"""Per-sample class labels by record key, for objectives that classify samples (MLCD's multi-label
cluster discrimination): read from a `lipkit data cluster` folder (`data.cluster_labels`), looked up by
the stable sample ids the trainer makes from the batch's record keys (train.inputs.sample_ids), so tables
and shards, every rank and every resume see the same labels for the same sample.

Each sample has L labels (its `labels` list — `lipkit data cluster --labels L` writes the L nearest
clusters — or its one `cluster`); a sample the clustering does not list (an image that could not be
decoded then, or a key of another table) gets −1, which objectives read as "no label".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lipkit.errors import UserError
from lipkit.train.inputs import sample_ids


class SampleLabels:
    """Sorted sample ids and their (n, L) labels (−1 pads), `num_classes` classes."""

    def __init__(self, keys: list[str], labels: list[list[int]], num_classes: int) -> None:
        width = max((len(x) for x in labels), default=1)
        table = torch.full((len(labels), width), -1, dtype=torch.int64)
        for i, row in enumerate(labels):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        ids = sample_ids(keys)
        order = ids.argsort()
        self.ids, self.labels, self.num_classes = ids[order], table[order], num_classes
        if len(self.ids) > 1 and bool((self.ids[1:] == self.ids[:-1]).any()):
            raise UserError(
                "The cluster labels list one key twice; write them again with `lipkit data cluster`."
            )

    @classmethod
    def from_clusters(cls, folder: str | Path) -> SampleLabels:
        """The labels of a finished `lipkit data cluster` folder (its cluster.json is written last)."""
        path = Path(folder).expanduser()
        if not (path / "cluster.json").is_file() or not (path / "clusters.jsonl").is_file():
            raise UserError(
                f"data.cluster_labels: '{folder}' is not a finished `lipkit data cluster` folder (no cluster.json); "
                "run `lipkit data cluster CHECKPOINT SOURCE OUT -k K --labels L` first."
            )
        k = int(json.loads((path / "cluster.json").read_text(encoding="utf-8"))["k"])
        keys, labels = [], []
        with (path / "clusters.jsonl").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    keys.append(row["key"])
                    labels.append([int(c) for c in row.get("labels", [row["cluster"]])])
        return cls(keys, labels, k)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) labels of these sample ids, −1 for ids the table does not hold."""
        table_ids, labels = self.ids.to(ids.device), self.labels.to(ids.device)
        if table_ids.numel() == 0:
            return torch.full((len(ids), labels.shape[1]), -1, dtype=torch.int64, device=ids.device)
        pos = torch.searchsorted(table_ids, ids).clamp(max=len(table_ids) - 1)
        found = table_ids[pos] == ids
        return torch.where(found[:, None], labels[pos], torch.full_like(labels[pos], -1))
