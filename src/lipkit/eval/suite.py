"""`lipkit eval`: evaluate a checkpoint on named sources (tables, shards, class folders, CLIP_benchmark
sets, ...) and write the results JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import rich
import torch

from lipkit.atomic import write_json_atomic
from lipkit.checkpoint import load_checkpoint
from lipkit.config import Config
from lipkit.config_eval import EvalConfig
from lipkit.data.frames import with_frame_count
from lipkit.data.image_store import ImageStore
from lipkit.data.records import spread_subset
from lipkit.data.sources.registry import eval_labels, read_table
from lipkit.device import use_bf16
from lipkit.errors import UserError
from lipkit.eval.evaluate import evaluate_records, fit_probes, image_style
from lipkit.eval.few_shot_protocol import few_shot_metrics
from lipkit.eval.similarity_choice import (
    head_objective,
    resolve_rerank,
    resolve_similarity,
    resolve_trained_settings,
)
from lipkit.malloc import keep_freed_memory


def run_eval(checkpoint: str | Path, splits: dict[str, str], cfg: Config, out: Path) -> dict[str, Any]:
    """Evaluate a checkpoint on `splits`, write the results to `out` and return them; under bf16 autocast
    with `eval.precision: bf16` (embeddings are returned in float32 either way)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(
        device, dtype=torch.bfloat16, enabled=use_bf16(cfg.eval.precision, torch.device(device).type)
    ):
        return _run_eval(checkpoint, splits, cfg, out)


def _run_eval(checkpoint: str | Path, splits: dict[str, str], cfg: Config, out: Path) -> dict[str, Any]:
    model, tokenizer, info = load_checkpoint(checkpoint)
    if torch.cuda.is_available():
        model = model.cuda()
    else:
        keep_freed_memory()  # CPU embedding without a page fault per batch (lipkit/malloc.py)
    d = cfg.data
    frames = model.spec.clip_frames or d.num_frames  # clips decode as many frames as the model trained on
    trained = info.get("train", {})
    similarity = resolve_similarity(cfg.eval.similarity, trained.get("objective"))
    eval_cfg = resolve_trained_settings(
        cfg.eval, trained.get("objective"), trained.get("objective_args") or {}
    )
    eval_cfg = resolve_rerank(eval_cfg, head_objective(info))
    results: dict[str, Any] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "model": {"preset": info.get("preset", "custom"), "params": model.num_params()},
        "splits": {},
    }
    probes = None
    if cfg.eval.linear_probe:
        table = d.train if cfg.eval.linear_probe == "train" else cfg.eval.linear_probe
        if not table:
            raise UserError(
                "eval.linear_probe=train needs the training table: add --set data.train=PATH "
                "(or --set eval.linear_probe=PATH)."
            )
        probe_records = read_table(table, d.image_column, d.caption_column, d.image_root)
        with_frame_count(probe_records, frames)
        probes = fit_probes(
            model, probe_records, cfg.eval.class_columns, cfg.eval.batch_size, image_style(cfg.eval)
        )
        if not probes:
            raise UserError(
                f"eval.linear_probe: the table {table} has no column of eval.class_columns "
                f"{cfg.eval.class_columns} with 2 or more classes; set eval.class_columns or unset eval.linear_probe."
            )
        results["linear_probe"] = {
            "table": str(table),
            "images": len(probe_records),
            "columns": {
                c: {
                    "classes": len(p.classes),
                    "lambda": p.lam,
                    "val_top1": None if math.isnan(p.val_top1) else p.val_top1,
                }
                for c, p in probes.items()
            },
        }
    scorer = None
    if cfg.eval.caption_scorer and model.has_captioner:  # CLIP-score by another checkpoint
        run_config = Path(checkpoint).expanduser().parent / "config.json"  # the run's: its model.init_from
        run = json.loads(run_config.read_text(encoding="utf-8")) if run_config.is_file() else {}
        started = (run.get("model") or {}).get("init_from") or ""
        scorer = _caption_scorer(cfg.eval.caption_scorer, checkpoint, model.device, started)
        results["caption_scorer"] = str(Path(cfg.eval.caption_scorer).expanduser().resolve())
    shot_records = _shot_table(cfg) if cfg.eval.few_shot else None
    with_frame_count(shot_records or [], frames)
    for name, path in splits.items():
        records = read_table(path, d.image_column, d.caption_column, d.image_root)
        records = spread_subset(with_frame_count(records, frames), cfg.eval.max_images)
        # evaluate_records decodes the split; the few-shot protocol reads the same store
        store = _split_store(model, records, eval_cfg) if shot_records is not None else None
        results["splits"][name] = evaluate_records(
            model,
            tokenizer,
            records,
            eval_cfg,
            store=store,
            similarity=similarity,
            probes=probes,
            split=name,
            labels=eval_labels(path),
            scorer=scorer,
        )
        if shot_records is not None:  # the few-shot protocol (eval.few_shot)
            _add_few_shot(results["splits"][name], model, tokenizer, store, shot_records, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results, indent=2)
    return results


def _split_store(model, records: list, cfg: EvalConfig) -> ImageStore:
    """A split's images decoded once, as evaluate_records would decode them itself."""
    return ImageStore(records, model.spec.image_size, cache=True, desc="evaluation", style=image_style(cfg))


def _add_few_shot(split: dict, model, tokenizer, store: ImageStore, shot_records: list, cfg: Config) -> None:
    """The few-shot protocol's metrics, chance and per-seed details into a split's results."""
    metrics, chance, details = few_shot_metrics(model, tokenizer, store, shot_records, cfg.eval)
    split["metrics"].update(metrics)
    split["chance"].update(chance)
    split["few_shot"] = details


def _shot_table(cfg: Config) -> list:
    """The table the few-shot protocol draws its shots from (eval.few_shot_table)."""
    d, table = cfg.data, cfg.eval.few_shot_table
    table = d.train if table == "train" else table
    if not table:
        raise UserError(
            "eval.few_shot draws its shots from the training table: add --set data.train=PATH (or --set "
            "eval.few_shot_table=PATH)."
        )
    if cfg.eval.few_shot_classes not in ("base", "all"):
        raise UserError(
            f"eval.few_shot_classes must be base (CoOp's base/novel split) or all, not '{cfg.eval.few_shot_classes}'."
        )
    return read_table(table, d.image_column, d.caption_column, d.image_root)


def _caption_scorer(path: str, checkpoint: str | Path, device: torch.device, started: str = "") -> tuple:
    """The checkpoint that gives CLIP-score (eval.caption_scorer), refused when missing; a note when it is
    the captioner itself or the checkpoint the captioner started from (`started`: its model.init_from)."""
    found = Path(path).expanduser()
    if not found.is_dir():
        raise UserError(
            f"eval.caption_scorer '{path}' is not a checkpoint directory; name another model's checkpoint "
            "(e.g. runs/demo/checkpoint) or unset it."
        )
    own = {Path(checkpoint).expanduser().resolve()} | (
        {Path(started).expanduser().resolve()} if started else set()
    )
    if found.resolve() in own:
        rich.get_console().print(
            "[yellow]eval:[/] eval.caption_scorer is the captioning checkpoint or the one it started from: "
            "its CLIP-score favours captions shaped by its own embedding; name another checkpoint",
            highlight=False,
        )
    model, tokenizer, _ = load_checkpoint(found)
    return model.to(device).eval(), tokenizer
