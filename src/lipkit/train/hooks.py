"""The hooks a training run (train.launch) hands the Trainer: evaluation on the eval tables, and
checkpoint writing (resumable checkpoints, the best one by `train.best_metric`, pruning, the final model).

Every rank calls them at the same steps (FSDP gathers weights there); only rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lipkit.atomic import write_text_atomic
from lipkit.checkpoint import prune, save_checkpoint
from lipkit.config import Config
from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.data.sources.registry import eval_labels
from lipkit.device import use_bf16
from lipkit.eval.evaluate import evaluate_records
from lipkit.eval.similarity_choice import resolve_rerank, resolve_similarity, resolve_trained_settings
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.distributed import gather_objects
from lipkit.train.trainer import Trainer


class Evaluator:
    """Metrics of every eval table (rank 0); prints each one's top-1 / R@1 and keeps the last metrics as
    `<table>/<metric>` for the best checkpoint."""

    def __init__(
        self,
        cfg: Config,
        tokenizer: TextTokenizer,
        tables: dict[str, Sequence[Record]],
        stores: dict[str, ImageStore],
        device: torch.device,
        console: Console,
    ) -> None:
        self.cfg, self.tokenizer, self.tables, self.stores = cfg, tokenizer, tables, stores
        self.device, self.console = device, console
        self.similarity = resolve_similarity(cfg.eval.similarity, cfg.train.objective)
        self.eval_cfg = resolve_rerank(
            resolve_trained_settings(cfg.eval, cfg.train.objective, cfg.train.objective_args),
            cfg.train.objective,
        )
        self.labels = {name: eval_labels(path) for name, path in cfg.data.eval.items()}
        self.last: dict[str, float] = {}

    def __call__(self, m: DualEncoder, step: int) -> dict[str, dict[str, float]]:
        bf16 = use_bf16(self.cfg.train.precision, self.device.type)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = {
                name: evaluate_records(
                    m,
                    self.tokenizer,
                    self.tables[name],
                    self.eval_cfg,
                    self.stores[name],
                    details=False,
                    similarity=self.similarity,
                    split=name,
                    labels=self.labels.get(name),
                )["metrics"]
                for name in self.tables
            }
        for name, metrics in out.items():
            top = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("top1", "R@1"))}
            self.console.print(f"  eval step {step} {name}: {top}")
            self.last.update({f"{name}/{k}": v for k, v in metrics.items()})
        return out


class CheckpointWriter:
    """Writes checkpoints/step-XXXXXXXX/ (with the data position), records the best by
    `train.best_metric` in best.json, keeps the last `train.keep_last` plus the best, and at the end the
    final model in checkpoint/."""

    def __init__(
        self, cfg: Config, run_dir: Path, tokenizer: TextTokenizer, batches: Any, evaluator: Evaluator
    ) -> None:
        self.cfg, self.run_dir, self.tokenizer, self.batches = cfg, run_dir, tokenizer, batches
        self.evaluator = evaluator  # its `last` metrics pick the best checkpoint
        self.best: dict[str, Any] = {"value": None, "path": None}

    def __call__(self, tr: Trainer, final: bool) -> Path:
        t, checkpoints = self.cfg.train, self.run_dir / "checkpoints"
        info = {
            "train": {
                "step": tr.step_count,
                "train_seconds": tr.train_seconds,
                "objective": t.objective,
                "objective_args": dict(t.objective_args),  # how evaluation scores it (e.g. wukong's K)
            },
            "preset": self.cfg.model.preset,
        }
        tensors, meta = tr.training_state()  # every rank comes here: under FSDP these two gather shards
        full_model = tr.unsharded()
        data = self.batches.state()  # this rank's position and skips; with several ranks, all of them
        if tr.dist.enabled:
            data = self.batches.merge_states(gather_objects(data))
        if not tr.dist.main:  # only rank 0 writes
            return checkpoints / f"step-{tr.step_count:08d}"
        path = save_checkpoint(
            checkpoints / f"step-{tr.step_count:08d}",
            full_model,
            self.tokenizer,
            info,
            training=(tensors, {**meta, "data": data}),  # + the data position
        )
        self._keep_best(path)
        prune(checkpoints, t.keep_last, {self.best["path"]} if self.best["path"] else set())
        if final:
            save_checkpoint(self.run_dir / "checkpoint", full_model, self.tokenizer, info)
        return path

    def _keep_best(self, path: Path) -> None:
        metric = self.cfg.train.best_metric
        value = self.evaluator.last.get(metric)
        if metric and value is not None and (self.best["value"] is None or value > self.best["value"]):
            self.best.update(value=value, path=path)
            write_text_atomic(
                self.run_dir / "checkpoints" / "best.json",
                json.dumps({"metric": metric, "value": value, "path": str(path)}),
            )
