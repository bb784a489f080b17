"""Assemble a training run from a `Config`: data, tokenizer, model, objective, loop, checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lipkit.config import Config
from lipkit.data.loader import ImageStore, TrainBatches
from lipkit.data.sources import read_table
from lipkit.eval.evaluate import evaluate_records
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.checkpoint import save_checkpoint
from lipkit.train.trainer import Trainer, TrainResult

console = Console(stderr=True)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_training(cfg: Config) -> tuple[Path, TrainResult]:
    """Train as configured; returns the run directory (holding `checkpoint/`, `metrics.jsonl`, `config.json`)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d = cfg.data
    spec_size = get_spec(cfg.model.preset, **cfg.model.overrides).image_size
    records = read_table(d.train, d.image_column, d.caption_column, d.image_root)
    eval_tables = {
        name: read_table(path, d.image_column, d.caption_column, d.image_root)
        for name, path in d.eval.items()
    }
    run_dir = Path(cfg.train.output).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")

    tk = cfg.tokenizer
    if tk.path:
        tokenizer = TextTokenizer.load(tk.path, tk.context_length)
    else:
        tokenizer = TextTokenizer.train(
            (c for r in records for c in r.captions), tk.vocab_size, tk.context_length
        )
    spec = get_spec(
        cfg.model.preset,
        **{
            **cfg.model.overrides,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "context_length": tk.context_length,
        },
    )
    model = DualEncoder(
        spec, init_logit_scale=cfg.train.init_logit_scale, max_logit_scale=cfg.train.max_logit_scale
    )
    device = pick_device()
    batches = TrainBatches(
        records, spec_size, cfg.train.batch_size, cfg.train.seed, d.caption_policy, d.cache_images, d.workers
    )
    stores = {
        name: ImageStore(recs, spec.image_size, cache=True, workers=d.workers, desc=name)
        for name, recs in eval_tables.items()
    }
    console.print(
        f"[bold]lipkit train[/]: {len(records)} pairs, {len(batches)} steps/epoch, model "
        f"{cfg.model.preset} ({model.num_params() / 1e6:.1f}M params), vocab {tokenizer.vocab_size}, "
        f"device {device}, run dir {run_dir}"
    )

    def evaluate(m: DualEncoder, step: int) -> dict[str, dict[str, float]]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            out = {
                name: evaluate_records(
                    m, tokenizer, eval_tables[name], cfg.eval, stores[name], details=False
                )["metrics"]
                for name in eval_tables
            }
        for name, metrics in out.items():
            top = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("top1", "R@1"))}
            console.print(f"  eval step {step} {name}: {top}")
        return out

    def save(m: DualEncoder, info: dict[str, Any]) -> None:
        save_checkpoint(
            run_dir / "checkpoint", m.cpu(), tokenizer, {"train": info, "preset": cfg.model.preset}
        )

    trainer = Trainer(
        model, build_objective(cfg.train.objective), tokenizer, cfg.train, cfg.augment, run_dir, device
    )
    result = trainer.fit(batches.epoch, len(batches), evaluate if eval_tables else None, save)
    console.print(
        f"trained {result.steps} steps ({result.samples} samples) in {result.seconds / 60:.1f} min; "
        f"checkpoint: {run_dir / 'checkpoint'}"
    )
    return run_dir, result
