"""The training loop: AdamW, warmup + cosine schedule, autocast, clipping, logging, eval hooks,
fault skipping and graceful preemption.

It owns nothing else: data arrives as batches per epoch, evaluation and checkpoint writing are
callbacks. The whole loop state (`training_state`) is small enough to checkpoint every few steps,
and resuming from it is bitwise exact on a CPU.

Read top to bottom: the state (`training_state`), one optimiser step (`step`), then the loop (`fit`), which
puts together the schedule (train.optim.Schedule), the clock (train.clock: training time, the ranks' shared
clock, samples/s), the checkpoint policy (train.checkpoint_policy: cadence, preemption) and `_evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipkit.checkpoint import TrainingState
from lipkit.config import AugmentConfig, TrainConfig
from lipkit.data.batching import jsonl_log
from lipkit.device import use_bf16
from lipkit.errors import UserError
from lipkit.malloc import keep_freed_memory
from lipkit.models.batch_stats import check_batch_statistics
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train import fsdp
from lipkit.train.checkpoint_policy import Preemption, on_save_cadence
from lipkit.train.clock import Clock, Throughput
from lipkit.train.distributed import Dist, all_true, check_scaling, gather_inputs, mean_over_ranks
from lipkit.train.grad_cache import grad_cache_backward
from lipkit.train.growth import grow_trainer, growth_schedule
from lipkit.train.inputs import (
    LOCAL_VIEW,
    SECOND_VIEW,
    check_inputs,
    keyed_ids,
    objective_inputs,
    objective_needs,
)
from lipkit.train.local_losses import local_loss
from lipkit.train.optim import Schedule, build_optimizer
from lipkit.train.progress import TrainBar, train_bar
from lipkit.train.state import load_optimizer_state, load_rng_state, optimizer_state, rng_state
from lipkit.train.teacher import FrozenTeacher, bound_teacher
from lipkit.train.views import ViewMaker, Views, view_plan

Batch = tuple[torch.Tensor, list[str], list[str]]  # uint8 images, captions, keys
Batches = Callable[[int, int], Iterator[Batch]]  # (epoch, start batch) -> batches
EvalHook = Callable[[DualEncoder, int], dict[str, dict[str, float]]]  # (model, step) -> split -> metrics
CheckpointHook = Callable[["Trainer", bool], Path]  # (trainer, final) -> checkpoint written


class TrainingFault(UserError):
    """Too many non-finite steps in a row."""


@dataclass
class _Run:
    """What one `fit` keeps between steps."""

    schedule: Schedule
    clock: Clock
    steps_per_epoch: int
    throughput: Throughput  # samples/s between log lines
    loss: float = float("nan")  # at the last log line
    stopped: bool = False  # the time budget ended the run
    in_a_row: int = 0  # non-finite steps


@dataclass
class TrainResult:
    steps: int
    samples: int
    seconds: float
    last_loss: float
    stopped_early: bool  # the time budget ended the run
    interrupted: bool = False  # a signal ended the run (checkpoint written)
    faults: int = 0


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
        captions_per_image: int = 1,
        dist: Dist | None = None,
        teacher: DualEncoder | None = None,
        sample_labels: Any = None,  # kind → train.sample_labels.SampleLabels (objectives' heads bound first)
    ) -> None:
        self.model, self.objective, self.tokenizer = model.to(device), objective.to(device), tokenizer
        self.cfg, self.aug, self.run_dir, self.device = cfg, augment_cfg, run_dir, device
        if device.type == "cpu":
            keep_freed_memory()  # no page faults on every step's activations (lipkit/malloc.py)
        self.needs = objective_needs(objective)  # names in the registry train.inputs.INPUTS
        self.per_image, self.dist = captions_per_image, dist or Dist()
        self.local_batch = cfg.batch_size // self.dist.world
        teacher = bound_teacher(objective, model, teacher)  # a momentum copy (TCL), or the frozen teacher
        self.teacher = teacher.to(device).eval() if teacher is not None else None
        self.sample_labels = sample_labels
        check_inputs(
            self.needs,
            captions_per_image,
            model.logit_bias is not None,
            cfg.objective,
            teacher is not None,
            model.has_lexicon,
            set(sample_labels or {}),
            model.spec.caption_input if model.has_captioner else "",
            model.has_matcher,
        )
        check_scaling(cfg, self.needs, self.dist)
        check_batch_statistics(model, self.dist.world, cfg.grad_cache_chunk, self.local_batch)  # BatchNorm
        self.sharded = self.dist.enabled and cfg.strategy == "fsdp"
        if self.sharded:  # FSDP units replace the towers' parameters with shards (before the optimizer)
            fsdp.shard_model(model)
        # objectives may own parameters too (optimised and kept in the trainer state)
        self.reduce_over = self.dist.world if self.dist.enabled and not self.sharded else 0  # DDP
        self.opt, self.params, self.reducer = build_optimizer(model, objective, cfg, device, self.reduce_over)
        self.growth = growth_schedule(cfg, self)  # train.grow: step → Growth
        self.bf16 = use_bf16(cfg.precision, device.type)  # not on a CPU that would emulate it
        self.gen = torch.Generator().manual_seed(cfg.seed)
        window = (self.dist.rank * self.local_batch, cfg.batch_size) if self.dist.enabled else None
        self.views = ViewMaker(model.spec, augment_cfg, self.gen, device, window)  # train.views
        self.view_plan = view_plan(bool(self.needs & SECOND_VIEW), bool(self.needs & LOCAL_VIEW), objective)
        if hasattr(model.visual, "cache_features"):  # a locked timm trunk: each image's features once
            cached = self.views.no_augmentation and not self.view_plan[1]  # random crops: never again
            model.visual.cache_features = cfg.cache_image_features and cached
        if isinstance(self.teacher, FrozenTeacher):  # its features of each un-augmented image once
            self.teacher.cache_images = cfg.cache_image_features and self.views.no_augmentation
        self.log = jsonl_log(run_dir / "metrics.jsonl")  # every log line; launch adds the trackers to it
        self.step_count = 0
        self.train_seconds = 0.0  # training wall time of earlier processes of this run (resume)
        self.faults = 0
        self.last_checkpoint: Path | None = None
        self.preemption = Preemption(self.dist.enabled)  # SIGTERM/SIGINT: checkpoint after the step

    # -- state -------------------------------------------------------------------------------------
    def unsharded(self) -> DualEncoder:
        """The model with every weight in place: itself, or under FSDP a gathered copy (a collective:
        every rank calls it)."""
        if not self.sharded:
            return self.model
        plain = fsdp.unsharded_copy(self.model, keep=self.dist.main)
        return plain if plain is not None else self.model  # other ranks: they only took part

    def training_state(self) -> TrainingState:
        """Everything a resume needs; under FSDP the optimizer moments are gathered (a collective)."""
        opt_t, opt_meta = optimizer_state(self.opt)
        opt_t = {k: fsdp.full(v) for k, v in opt_t.items()}
        rng_t, rng_meta = rng_state(self.gen)
        objective = {f"objective.{k}": v.detach() for k, v in self.objective.state_dict().items()}
        meta = {
            "step": self.step_count,
            "train_seconds": self.train_seconds,
            "faults": self.faults,
            "optimizer": opt_meta,
            "rng": rng_meta,
        }
        if self.reducer is not None and self.reducer.rebuilt:  # a resumed run buckets (sums) alike
            meta["bucket_order"] = self.reducer.order()
        return {**opt_t, **rng_t, **objective}, meta

    def load_training_state(self, state: TrainingState) -> None:
        tensors, meta = state
        load_optimizer_state(self.opt, tensors, meta["optimizer"])
        if self.sharded:  # full moments from the file → this rank's shards
            fsdp.shard_optimizer_state(self.opt)
        load_rng_state(self.gen, tensors, meta["rng"])
        prefix = "objective."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if own:
            self.objective.load_state_dict(own)
        self.step_count, self.train_seconds, self.faults = meta["step"], meta["train_seconds"], meta["faults"]
        if self.reducer is not None and "bucket_order" in meta:
            self.reducer.load_order(meta["bucket_order"])

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            self.log(record)

    # -- one step ----------------------------------------------------------------------------------
    def _inputs(
        self,
        images: torch.Tensor,
        ids: torch.Tensor,
        views: Views,
        only: set[str] | None = None,
        keys: torch.Tensor | None = None,
    ) -> dict:
        """The objective's inputs (or only the names `only` of them) of these images and their captions."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return objective_inputs(
                self.model,
                self.needs,
                images,
                ids,
                self.per_image,
                views,
                self.tokenizer.pad_id,
                self.teacher,
                only,
                keys,
                self.sample_labels,
                self.step_count,
            )

    def _loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        if self.dist.enabled and self.cfg.local_loss:
            return local_loss(self.objective, out, self.dist)
        if self.dist.enabled:
            out = gather_inputs(out, self.dist, self.local_batch)
        return self.objective(**out)

    def _grad_cache_backward(
        self, images: torch.Tensor, ids: torch.Tensor, views: Views, keys: torch.Tensor | None
    ) -> torch.Tensor:
        """The step's backward by gradient caching (train.grad_cache), see train.grad_cache."""
        k = self.per_image

        def embed(rows: slice, names: set[str]) -> dict[str, torch.Tensor]:
            part = keys[rows] if keys is not None else None
            return self._inputs(
                images[rows], ids[rows.start * k : rows.stop * k], views[rows], names, keys=part
            )

        arm = self.reducer.arm if self.reducer is not None else None  # buckets start in the last pass
        return grad_cache_backward(
            embed, images.shape[0], self.cfg.grad_cache_chunk, self.needs, self._loss, self.device, arm
        )

    def step(
        self, images_u8: torch.Tensor, captions: list[str], lr: float, keys: list[str] | None = None
    ) -> tuple[torch.Tensor, bool]:
        """One optimiser step on this rank's share of the global batch — its `train.batch_size / world`
        images, their captions and the records' keys, as the data sources hand them out; returns (loss,
        finite). A non-finite loss or gradient on any rank skips the update on all ranks."""
        if images_u8.shape[0] != self.local_batch:  # a programming error: the sources yield local batches
            raise ValueError(f"expected this rank's {self.local_batch} images, got {images_u8.shape[0]}")
        b = self.local_batch
        images = self.views.view(images_u8)
        views = self.views.views(images_u8, *self.view_plan)
        ids = self.tokenizer(captions).to(self.device)
        sample = keyed_ids(keys, self.needs, self.device)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.opt.zero_grad(set_to_none=True)
        if self.cfg.grad_cache_chunk and self.cfg.grad_cache_chunk < b:
            loss = self._grad_cache_backward(images, ids, views, sample)
        else:
            loss = self._loss(self._inputs(images, ids, views, keys=sample))
            if self.reducer is not None:
                self.reducer.arm()
            loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.sharded:  # FSDP averaged the shards' gradients already; the rest are replicated
            fsdp.average_replicated(self.params)
            grad_norm = fsdp.clip_grad_norm(self.params, clip)
        else:
            if self.reducer is not None:
                self.reducer.finish()
            grad_norm = nn.utils.clip_grad_norm_(self.params, clip)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if self.dist.enabled:
            finite = all_true(finite)
        if not bool(finite):  # the step's one host sync
            self.opt.zero_grad(set_to_none=True)
            return loss.detach(), False
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))
            if hasattr(self.objective, "after_step"):  # e.g. the momentum model's EMA update
                self.objective.after_step(self.model)
        return loss.detach(), True

    # -- the loop ----------------------------------------------------------------------------------
    def fit(
        self,
        batches: Batches,
        steps_per_epoch: int,
        evaluate: EvalHook | None = None,
        checkpoint: CheckpointHook | None = None,
    ) -> TrainResult:
        """Train to the end of the schedule, the time budget or a stop signal, evaluating and writing
        checkpoints on their cadence and at the end. Every rank runs the same steps and calls the hooks
        after the same steps (collectives inside); only rank 0 evaluates, logs and writes."""
        cfg, step, stop = self.cfg, self.step_count, self.preemption
        schedule, clock = Schedule.of(cfg, steps_per_epoch), Clock(self.train_seconds)
        run = _Run(schedule, clock, steps_per_epoch, Throughput(step, cfg.batch_size))
        total = schedule.total
        self.model.train()
        with stop.installed(), train_bar(schedule, clock, step, self.dist.main) as bar:
            epoch, first = divmod(step, steps_per_epoch)
            if self.dist.enabled:  # the first step's lr already follows the common clock
                clock.sync(None)
            while step < total and not run.stopped and stop.agreed is None:
                for images, captions, keys in batches(epoch, first):
                    lr = schedule.lr(step, schedule.progress(step, clock.now))
                    loss, finite = self.step(images, captions, lr, keys)
                    step = self.step_count = step + 1
                    if step in self.growth:  # before this step's evaluation and checkpoint
                        grow_trainer(self, self.growth[step], step)
                    if self.dist.enabled:  # every rank stops at the same step, follows the same schedule
                        stop.agreed = clock.sync(stop.pending)
                    bar.show(step)
                    self._count_fault(run, step, loss, finite, keys)
                    if step % cfg.log_every == 0 or step == total:
                        self._log_train(run, step, loss, lr, bar)
                    if evaluate and schedule.every(cfg.eval_every, step):
                        self._evaluate(evaluate, step, clock)
                    if schedule.every(cfg.save_every, step):
                        self._save(checkpoint, clock, final=False)
                    run.stopped = schedule.stops_early(step, clock.now)
                    if step >= total or run.stopped or stop.agreed is not None:
                        break
                epoch, first = epoch + 1, 0
        return self._finish(run, step, evaluate, checkpoint)

    def _count_fault(self, run: _Run, step: int, loss: torch.Tensor, finite: bool, keys: list[str]) -> None:
        """A non-finite step was skipped: count and log it; `train.max_faults` in a row end the run."""
        if finite:
            run.in_a_row = 0
            return
        self.faults, run.in_a_row = self.faults + 1, run.in_a_row + 1
        self._log({"kind": "fault", "step": step, "loss": float(loss), "keys": keys[:8]})
        if run.in_a_row >= self.cfg.max_faults:
            where = self.last_checkpoint or "none yet"
            raise TrainingFault(
                f"Step {step}: {run.in_a_row} non-finite losses or gradients in a row (batch keys: "
                f"{', '.join(keys[:3])} …); the last good checkpoint is {where} — lower "
                "train.lr, enable train.grad_clip or remove the bad samples, then resume."
            )

    def _log_train(self, run: _Run, step: int, loss: torch.Tensor, lr: float, bar: TrainBar) -> None:
        if self.dist.enabled and self.cfg.local_loss:  # each rank holds its share: log their mean
            loss = mean_over_ranks(loss)
        run.loss = float(loss)
        sps = run.throughput.samples_per_s(step)
        scale = float(self.model.scale().detach())
        # objectives may report a few numbers of their last step (e.g. LexLIP's non-zero terms)
        extra = {k: float(v) for k, v in getattr(self.objective, "last_stats", {}).items()}
        self._log(
            {
                **extra,
                "kind": "train",
                "step": step,
                "epoch": round(step / run.steps_per_epoch, 4),
                "loss": run.loss,
                "lr": lr,
                "logit_scale": scale,
                "samples_per_s": sps,
                "time_s": run.clock.elapsed(),
                "faults": self.faults,
            }
        )
        bar.info(f"loss {run.loss:.3f}  {sps:.0f} samples/s  T={scale:.1f}")

    def _evaluate(self, evaluate: EvalHook, step: int, clock: Clock) -> None:
        """Every rank comes here (FSDP gathers the weights); rank 0 evaluates. Not training time."""
        with clock.paused():
            model = self.unsharded()
            if self.dist.main:
                for split, metrics in evaluate(model, step).items():
                    self._log({"kind": "eval", "step": step, "split": split, "metrics": metrics})
            self.model.train()

    def _save(self, checkpoint: CheckpointHook | None, clock: Clock, final: bool) -> None:
        self.train_seconds = clock.restart()
        if checkpoint:
            self.last_checkpoint = checkpoint(self, final)

    def _finish(
        self, run: _Run, step: int, evaluate: EvalHook | None, checkpoint: CheckpointHook | None
    ) -> TrainResult:
        """After a stop signal: a checkpoint (unless this step's is written already); else the final
        evaluation and checkpoint."""
        samples = step * self.cfg.batch_size
        if self.preemption.agreed is not None:
            if not on_save_cadence(self.cfg.save_every, step):
                self._save(checkpoint, run.clock, final=False)
            return TrainResult(step, samples, run.clock.elapsed(), run.loss, False, True, self.faults)
        if evaluate:
            self._evaluate(evaluate, step, run.clock)
        self._save(checkpoint, run.clock, final=True)
        return TrainResult(step, samples, self.train_seconds, run.loss, run.stopped, False, self.faults)
