"""Model growth during training (`train.grow`): a schedule of function-preserving growths
(models.growth), each applied after its step — before that step's evaluation and checkpoint — with the
optimizer rebuilt over the grown parameters and its moments carried over (models.growth.grow_moment).

    train:
      grow:
        - {at_step: 100, towers: both, width: 2, depth: 2}   # double both towers' width, +2 blocks each

A resumed run replays the growths up to its checkpoint's step on the freshly built model before it loads
the weights (`replay`), so it continues with the architecture it saved. Every rank grows alike (the split
noise is drawn from a generator seeded by train.seed and the step), so two ranks train like one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lipkit.config import TrainConfig
from lipkit.errors import UserError
from lipkit.models.growth import Growth, grow_model, grow_moment, grown_spec
from lipkit.train.optim import build_optimizer

console = Console(stderr=True)
KEYS = {"at_step", "towers", "width", "depth", "noise", "momentum"}


def parse_schedule(entries: list[dict[str, Any]]) -> dict[int, Growth]:
    """`train.grow` → {step: Growth}, refusing unknown keys, steps below 1 and repeated steps."""
    out: dict[int, Growth] = {}
    for entry in entries:
        types = {"at_step": int, "towers": str, "width": int, "depth": int, "noise": (int, float)}
        types["momentum"] = (int, float)
        if (
            not isinstance(entry, dict)
            or not set(entry) <= KEYS
            or "at_step" not in entry
            or any(not isinstance(v, types[k]) or isinstance(v, bool) for k, v in entry.items())
            or entry.get("noise", 0) < 0
            or not 0 <= entry.get("momentum", 1) <= 1
        ):
            raise UserError(
                "train.grow entries are mappings with an integer at_step and optionally towers (image, text or "
                f"both), integer width and depth, noise ≥ 0 and momentum in [0, 1], e.g. {{at_step: 100, towers: both, width: 2, "
                f"depth: 2}}; got {entry!r}."
            )
        step = entry["at_step"]
        if step < 1 or step in out:
            raise UserError(f"train.grow's at_step values must be ≥ 1 and distinct; {step} is not.")
        out[step] = Growth(**{k: v for k, v in entry.items() if k != "at_step"})
    return dict(sorted(out.items()))


def growth_schedule(cfg: TrainConfig, trainer: Any) -> dict[int, Growth]:
    """The trainer's schedule, checked against what it trains (every growth is checked on the model it
    will meet, so a bad entry fails before the first step, not at its own)."""
    schedule = parse_schedule(cfg.grow)
    if not schedule:
        return schedule
    if trainer.sharded or cfg.compile:
        raise UserError("train.grow does not combine with train.strategy=fsdp or train.compile; unset one.")
    if hasattr(trainer.objective, "bind_model") and trainer.teacher is not None:  # bound: its momentum model
        raise UserError(
            f"Objective '{cfg.objective}' keeps a momentum copy of the model, which would not grow with it; "
            "unset train.grow."
        )
    for tower, attr in (("image", "visual"), ("text", "text")):
        if any(g.grows(tower) for g in schedule.values()) and not all(
            p.requires_grad for p in getattr(trainer.model, attr).parameters()
        ):
            raise UserError(
                f"The {tower} tower is locked (train.lock_{tower}) and a locked tower does not grow; unlock it "
                "or leave it out of train.grow's towers."
            )
    spec = trainer.model.spec
    for g in schedule.values():  # (a resumed run's model has grown already: checking again is harmless)
        spec = grown_spec(spec, g)
    return schedule


def grow_trainer(trainer: Any, g: Growth, step: int) -> None:
    """Grow the trainer's model after `step`, rebuild its optimizer (and DDP reducer) and carry the
    AdamW moments to the grown parameters."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    before = sum(p.numel() for p in trainer.model.parameters())
    old_state = dict(trainer.opt.state)
    by_name = {names[id(p)]: st for p, st in old_state.items() if id(p) in names}
    if trainer.reducer is not None:
        trainer.reducer.close()
    sources = grow_model(trainer.model, g, seed=seed_of(trainer.cfg.seed, step))
    trainer.model.to(trainer.device)
    trainer.opt, trainer.params, trainer.reducer = build_optimizer(
        trainer.model, trainer.objective, trainer.cfg, trainer.device, trainer.reduce_over
    )
    for p in trainer.objective.parameters():  # the objective's own parameters are the same tensors
        if p in old_state:
            trainer.opt.state[p] = old_state[p]
    for name, p in trainer.model.named_parameters():
        src, state = sources[name], by_name.get(sources[name].old)
        if state is None or src.fresh or not p.requires_grad:
            continue
        trainer.opt.state[p] = {
            "step": state["step"].clone(),
            "exp_avg": grow_moment(state["exp_avg"], src, 1).to(p),
            "exp_avg_sq": grow_moment(state["exp_avg_sq"], src, 2).to(p),
        }
    after = sum(p.numel() for p in trainer.model.parameters())
    record = {"kind": "grow", "step": step, "params_before": before, "params_after": after, **vars(g)}
    trainer._log(record)
    if trainer.dist.main:
        console.print(
            f"step {step}: grew {g.towers} (width ×{g.width}, +{g.depth} blocks): {before:,} → {after:,} params"
        )


def seed_of(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def replay(model: torch.nn.Module, cfg: TrainConfig, checkpoint: Path) -> None:
    """A resumed run: the growths up to the checkpoint's step applied to the freshly built model (its
    weights are about to be replaced by the checkpoint's)."""
    step = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["step"]
    for at, g in parse_schedule(cfg.grow).items():
        if at <= step:
            grow_model(model, g, seed=seed_of(cfg.seed, at))
    saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["model"]
    shape = ("vision_width", "vision_heads", "vision_layers", "text_width", "text_heads", "text_layers")
    if any(saved.get(k, getattr(model.spec, k)) != getattr(model.spec, k) for k in shape):
        raise UserError(
            f"The checkpoint {checkpoint} was saved by a run that grew differently; resume with the "
            "train.grow schedule (and model settings) it was trained with."
        )
