"""The training loop: AdamW, warmup + cosine schedule, autocast, clipping, logging, eval hooks.

It owns nothing else: data arrives as an iterator of (uint8 images, captions) per epoch, evaluation
is a callback, and checkpoints are written by a callback too.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from lipkit.config import AugmentConfig, TrainConfig
from lipkit.data.transforms import augment, normalize
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer

Batches = Callable[[int], Iterator[tuple[torch.Tensor, list[str]]]]  # epoch -> batches
EvalHook = Callable[[DualEncoder, int], dict[str, dict[str, float]]]  # (model, step) -> split -> metrics
SaveHook = Callable[[DualEncoder, dict[str, Any]], None]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: no decay on biases, norms, embeddings' scalars or the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` as `progress` goes 0 → 1."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    steps: int
    samples: int
    seconds: float
    last_loss: float
    stopped_early: bool


class Trainer:
    def __init__(
        self,
        model: DualEncoder,
        objective: nn.Module,
        tokenizer: TextTokenizer,
        cfg: TrainConfig,
        augment_cfg: AugmentConfig,
        run_dir: Path,
        device: torch.device,
    ) -> None:
        self.model, self.objective, self.tokenizer = model.to(device), objective, tokenizer
        self.cfg, self.aug, self.run_dir, self.device = cfg, augment_cfg, run_dir, device
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.eval_seconds = 0.0

    def _log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, images_u8: torch.Tensor, captions: list[str], lr: float) -> float:
        spec = self.model.spec
        images = normalize(images_u8, spec.image_mean, spec.image_std)
        images = augment(images, self.gen, self.aug.scale_min, self.aug.rotate_deg, self.aug.hflip)
        images = images.to(self.device, non_blocking=True)
        ids = self.tokenizer(captions).to(self.device, non_blocking=True)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = self.model(images, ids)
            loss = self.objective(**{k: v.float() for k, v in out.items()})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
        return loss.detach()

    def fit(
        self,
        batches: Batches,
        steps_per_epoch: int,
        evaluate: EvalHook | None = None,
        save: SaveHook | None = None,
    ) -> TrainResult:
        cfg = self.cfg
        total = max(1, int(cfg.epochs * steps_per_epoch))
        batch_size = cfg.batch_size
        self.model.train()
        start = time.perf_counter()
        self.eval_seconds = 0.0  # excluded from the time budget
        budget = cfg.max_minutes * 60
        warm = min(cfg.warmup_steps, total - 1) / total  # the part of the run spent warming up

        def progress(step: int) -> float:
            """Fraction of the run done: by steps, or by training wall time when that budget ends first."""
            by_steps = step / total
            if not budget:
                return by_steps
            return max(by_steps, (time.perf_counter() - start - self.eval_seconds) / budget)

        last_log_t, last_log_step, loss_value, step, stopped = start, 0, float("nan"), 0, False
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns) as bar:
            task = bar.add_task("train", total=total, info="")
            epoch = 0
            while step < total and not stopped:
                for images, captions in batches(epoch):
                    decay = max(0.0, progress(step) - warm) / (1 - warm)
                    lr = cfg.lr * lr_factor(step, decay, cfg.warmup_steps, cfg.min_lr_ratio)
                    loss = self.step(images, captions, lr)
                    step += 1
                    bar.advance(task)
                    if step % cfg.log_every == 0 or step == total:
                        loss_value = float(loss)  # the only host sync, once per log interval
                        now = time.perf_counter()
                        sps = (step - last_log_step) * batch_size / max(1e-9, now - last_log_t)
                        last_log_t, last_log_step = now, step
                        scale = float(self.model.scale().detach())
                        self._log(
                            {
                                "kind": "train",
                                "step": step,
                                "epoch": round(step / steps_per_epoch, 4),
                                "loss": loss_value,
                                "lr": lr,
                                "logit_scale": scale,
                                "samples_per_s": sps,
                                "time_s": now - start,
                            }
                        )
                        bar.update(task, info=f"loss {loss_value:.3f}  {sps:.0f} samples/s  T={scale:.1f}")
                    if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                        self._evaluate(evaluate, step)
                    stopped = step < total and progress(step) >= 1.0
                    if step >= total or stopped:
                        break
                epoch += 1
        seconds = time.perf_counter() - start
        if evaluate:
            self._evaluate(evaluate, step)
        if save:
            save(self.model, {"step": step, "epoch": step / steps_per_epoch, "train_seconds": seconds})
        return TrainResult(step, step * batch_size, seconds, loss_value, stopped)

    def _evaluate(self, evaluate: EvalHook, step: int) -> None:
        t = time.perf_counter()
        for split, metrics in evaluate(self.model, step).items():
            self._log({"kind": "eval", "step": step, "split": split, "metrics": metrics})
        self.model.train()
        self.eval_seconds += time.perf_counter() - t
