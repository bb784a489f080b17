"""The per-sample tables an objective reads, built from the training data before any image is decoded:
cluster labels and table-column classes (train.sample_labels), boxes with region captions (train.regions),
concepts (train.concepts). Each is looked up per batch by the records' keys (train.inputs)."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

from lipkit.config import Config
from lipkit.errors import UserError
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.concepts import ConceptTable
from lipkit.train.inputs import objective_needs
from lipkit.train.regions import RegionTable
from lipkit.train.sample_labels import SampleLabels

console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")


def objective_labels(
    cfg: Config, data: Any, objective: Any, tokenizer: TextTokenizer, embed_dim: int
) -> dict[str, Any]:
    """Kind ("clusters", "columns", "regions", "concepts") → the table of it the objective reads."""
    labels: dict[str, Any] = dict(sample_labels(cfg, data, objective, embed_dim))
    if getattr(objective, "region_columns", None) and "region_features" in objective_needs(objective):
        labels["regions"] = regions(cfg, data, objective.region_columns, tokenizer)
    if getattr(objective, "concepts_column", None) and "concept_features" in objective_needs(objective):
        labels["concepts"] = concepts(cfg, data, objective.concepts_column, tokenizer)
    return labels


def sample_labels(cfg: Config, data: Any, objective: Any, embed_dim: int) -> dict[str, SampleLabels]:
    """The per-sample labels the objective reads (train.sample_labels), its heads sized to them."""
    d, labels = cfg.data, {}
    if d.cluster_labels:
        labels["clusters"] = SampleLabels.from_clusters(d.cluster_labels)
        if hasattr(data, "records"):  # a table: its keys must meet the labels'
            share = labels["clusters"].check_covers([r.key for r in data.records], str(d.train))
            if share < 1:
                console.print(f"[yellow]{1 - share:.1%} of the training samples have no cluster labels[/]")
        if hasattr(objective, "bind"):  # class centres: one per cluster, model-wide
            objective.bind(labels["clusters"].num_classes, embed_dim)
    columns = list(getattr(objective, "label_columns", ()))
    if columns:
        if not hasattr(data, "records"):
            raise UserError(
                f"Objective '{cfg.train.objective}' reads the columns {', '.join(columns)} of every row up front; "
                "train on a table (JSONL, CSV, parquet), not on shards."
            )
        labels["columns"] = SampleLabels.from_records(data.records, columns, str(d.train))
        objective.bind_columns(labels["columns"].classes, embed_dim)
    return labels


def regions(cfg: Config, data: Any, columns: tuple[str, str], tokenizer: TextTokenizer) -> RegionTable:
    """The table's boxes and region captions (train.regions); boxes cannot follow a geometric augmentation."""
    a = cfg.augment
    if a.scale_min < 1 or a.rotate_deg or a.hflip:
        raise UserError(
            f"Objective '{cfg.train.objective}' reads boxes of the image as the model sees it, which random crops, "
            "rotation and mirroring move; set augment.scale_min=1 augment.rotate_deg=0 augment.hflip=false."
        )
    if not hasattr(data, "records"):
        raise UserError(
            f"Objective '{cfg.train.objective}' reads the box columns of every row up front; train on a table "
            "(JSONL, CSV, parquet), not on shards."
        )
    return RegionTable.from_records(data.records, *columns, tokenizer, str(cfg.data.train))


def concepts(cfg: Config, data: Any, column: str, tokenizer: TextTokenizer) -> ConceptTable:
    """The table's concepts per row (train.concepts); says what share of them its captions spell."""
    if not hasattr(data, "records"):
        raise UserError(
            f"Objective '{cfg.train.objective}' reads the concepts column of every row up front; train on a table "
            "(JSONL, CSV, parquet), not on shards."
        )
    table = ConceptTable.from_records(data.records, column, tokenizer, str(cfg.data.train))
    if table.found < 1:
        console.print(
            f"[yellow]{1 - table.found:.1%} of the concepts in '{column}' are spelled by none of their row's "
            "captions as the tokenizer splits them (or sit past the context length) and never take part[/]"
        )
    return table
