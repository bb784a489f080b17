"""Assemble a training run from a `Config`: data, tokenizer, model, objective, loop, checkpoints.

Run directory layout:
    config.json        the resolved config
    metrics.jsonl      one JSON object per log / eval / fault line
    checkpoints/       resumable checkpoints step-XXXXXXXX/ (last `keep_last`, plus the best)
    checkpoint/        the final model (what `lipkit eval` and friends take)
    tracking.json      with train.report_to: the experiment trackers' run ids (train.tracking), beside
                       their tensorboard/, wandb/ and (without MLFLOW_TRACKING_URI) mlruns/
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from lipkit.atomic import write_text_atomic
from lipkit.checkpoint import find_resume, load_checkpoint, load_training_state
from lipkit.config import Config
from lipkit.data.batching import jsonl_log, skip_summary
from lipkit.data.frames import with_frame_count
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import open_train_data, read_table
from lipkit.device import pick_device, use_bf16
from lipkit.errors import UserError
from lipkit.eval.evaluate import check_has_images, image_style
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.hf_text import resolve_pretrained
from lipkit.models.image_weights import image_tower_settings, load_trunk_weights
from lipkit.models.presets import ModelSpec, get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.captioner_setup import attach_captioner, new_model_settings, prepare_text_only
from lipkit.train.clip_setup import prepare_clips
from lipkit.train.connector_setup import prepare_prefix
from lipkit.train.distributed import Dist, check_batch_split, gather_objects, run_ended
from lipkit.train.distributed import init as init_distributed
from lipkit.train.growth import replay as replay_growth
from lipkit.train.hooks import CheckpointWriter, Evaluator
from lipkit.train.inputs import check_not_adapted, check_patch_tokens, objective_needs, requires
from lipkit.train.matcher_setup import attach_matcher, matcher_settings
from lipkit.train.objective_labels import objective_labels
from lipkit.train.teacher import check_same_tokenizer, load_teacher
from lipkit.train.tracking import Trackers, open_trackers
from lipkit.train.trainer import Trainer, TrainResult

console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")
# model settings a resumed run takes from its checkpoint, not from the config: the image tower's shape,
# input size and normalisation (the weights and the data pipeline must be those it was saved with)
RESUMED = (
    "stem_norm",
    "vision_tower",
    "timm_model_name",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "image_size",
    "image_mean",
    "image_std",
)


def _prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"Output directory '{run_dir}' is not writable ({e.strerror}); "
            "set train.output to a writable place."
        ) from e


def _resume_point(cfg: Config, run_dir: Path) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        return find_resume(run_dir / "checkpoints")
    path = Path(cfg.train.resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise UserError(
            f"train.resume '{path}' is not a resumable checkpoint; use train.resume=auto or a "
            f"directory under {run_dir / 'checkpoints'}."
        )
    return path


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log reads as one run."""
    if path.is_file():
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        write_text_atomic(path, "".join(x + "\n" for x in kept))  # a crash here must not lose the log


def _new_model(
    cfg: Config, tokenizer: TextTokenizer, objective: Any, pretrained: Path | None, resume: Path | None
) -> DualEncoder:
    """The configured model; when resuming, with the image tower's settings (`RESUMED`) as the checkpoint
    saved them: a resumed run computes what it saved, also when a default changed since it started (the
    conv stem's norm, the demo's image tower) — those that differ from the config are named once."""
    t = cfg.train
    fixed: dict[str, Any] = {
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "context_length": cfg.tokenizer.context_length,
    }
    needs = objective_needs(objective)  # what its inputs require (train.inputs.INPUTS)
    if requires(needs, "bias"):
        fixed["logit_bias"] = True
    if requires(needs, "lexicon") and not cfg.model.overrides.get("lexicon_vocab"):
        fixed["lexicon_vocab"] = tokenizer.vocab_size  # LexLIP: one weight per tokenizer term
    fixed.update(new_model_settings(needs, cfg.model.overrides))  # CoCa's, a text-only caption decoder
    fixed.update(matcher_settings(needs, cfg.model.overrides))  # an image–text matching head (itm)
    if pretrained is not None:
        hf_config = json.loads((pretrained / "config.json").read_text(encoding="utf-8"))
        fixed.update(text_tower="hf", text_hf_config=hf_config, text_pool=cfg.model.text_pool)
    image = image_tower_settings(cfg.model.image_pretrained, cfg.model.overrides)
    spec = get_spec(cfg.model.preset, **{**image, **cfg.model.overrides, **fixed})
    if resume is not None:  # the image tower as it was saved (settings added since: their old value)
        saved = ModelSpec.from_dict(json.loads((resume / "config.json").read_text(encoding="utf-8"))["model"])
        kept = {k: getattr(saved, k) for k in RESUMED}
        changed = [k for k, v in kept.items() if getattr(spec, k) != v]
        if changed:
            console.print(
                f"[yellow]resuming with the checkpoint's {', '.join(changed)}[/] (not the config's)"
            )
        spec = replace(spec, **kept)
    model = DualEncoder(
        spec,
        init_logit_scale=t.init_logit_scale,
        max_logit_scale=t.max_logit_scale,
        init_logit_bias=t.init_logit_bias,
    )
    if pretrained is not None and resume is None:
        model.text.load_pretrained(pretrained)
    if cfg.model.image_pretrained and resume is None:
        load_trunk_weights(model.visual.trunk, cfg.model.image_pretrained)
    return model


def run_training(cfg: Config) -> tuple[Path, TrainResult]:
    """Train as configured; returns the run directory and what happened."""
    dist = init_distributed()
    run_ended(False)
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial model
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    d, t = cfg.data, cfg.train
    check_batch_split(t.batch_size, dist.world)  # before any data is read (the trainer checks it again)
    data = open_train_data(d)  # a table, parquet, a folder of images or WebDataset shards
    eval_tables = {
        name: with_frame_count(
            read_table(path, d.image_column, d.caption_column, d.image_root),
            d.num_frames,  # uniform
        )
        for name, path in d.eval.items()
    }
    run_dir = Path(t.output).expanduser()
    resume = _start_run_dir(cfg, run_dir)
    # train.report_to: the libraries checked on every rank; rank 0's trackers start (or continue their
    # runs) before the model is built and the eval images cached, so that one that cannot start (W&B not
    # logged in) stops the run at once, and finish with training, failed or not
    with open_trackers(cfg, run_dir, resume, dist.main, dist.enabled) as trackers:
        result, batches, trainer = _fit(cfg, dist, data, eval_tables, run_dir, resume, trackers)
    skipped = Counter(batches.skipped)
    if dist.enabled:  # each rank skipped in its own share: the run's are the sum
        skipped = sum((Counter(s) for s in gather_objects(dict(skipped))), Counter())
    _print_summary(result, skipped, trainer.last_checkpoint, run_dir)
    run_ended(True)  # every rank got here: at exit they leave the group together (train.distributed)
    return run_dir, result


def _fit(
    cfg: Config,
    dist: Dist,
    data: Any,
    eval_tables: dict,
    run_dir: Path,
    resume: Path | None,
    trackers: Trackers,
) -> tuple[TrainResult, Any, Trainer]:
    """Model, data stream, eval images and trainer, then training (a resumed run's from its checkpoint)."""
    d, t = cfg.data, cfg.train
    tokenizer, model, objective, teacher = _build_model(cfg, data, resume)
    if cfg.train.precision == "bf16" and not torch.cuda.is_available() and not use_bf16("bf16", "cpu"):
        console.print(
            "[yellow]this CPU has no native bf16 (AVX512-BF16, AMX): training and evaluation run in fp32[/] "
            "(emulated bf16 is several times slower)"
        )
    labels = objective_labels(
        cfg, data, objective, tokenizer, model.spec.embed_dim
    )  # before any image is decoded
    device = pick_device("auto", dist.local_rank)
    log = trackers.tee(jsonl_log(run_dir / "metrics.jsonl")) if dist.main else None  # + the trackers
    # this rank's share of every global batch; skips logged as kind "data" (rank 0's)
    batches = data.batches(model.spec.image_size, t.batch_size, t.seed, log, dist.rank, dist.world)
    style = image_style(cfg.eval)  # how evaluation decodes images (eval.protocol)
    stores = {
        name: ImageStore(recs, model.spec.image_size, cache=True, workers=d.workers, desc=name, style=style)
        for name, recs in eval_tables.items()
    }
    for name, store in stores.items():  # before training, on every rank: not after it, on rank 0 alone
        check_has_images(name, store)
    if resume is not None:  # the weights go in before the trainer (FSDP) shards them
        replay_growth(model, cfg.train, resume)  # the architecture it saved (train.grow)
        model.load_state_dict(load_file(str(resume / "model.safetensors")))
    trainer = Trainer(
        model,
        objective,
        tokenizer,
        t,
        cfg.augment,
        run_dir,
        device,
        d.captions_per_image,
        dist,
        teacher,
        labels,
    )
    if log is not None:  # the trainer's log lines go to metrics.jsonl and the trackers alike
        trainer.log = log
    if resume is not None:
        _resume(trainer, batches, resume, run_dir)
    console.print(
        f"[bold]lipkit train[/]: {batches.num_samples} pairs, {len(batches)} steps/epoch, model {cfg.model.preset} "
        f"({model.num_params() / 1e6:.1f}M params), vocab {tokenizer.vocab_size}, device {device}"
        f"{f' × {dist.world} ranks ({torch.distributed.get_backend()}, {t.strategy})' if dist.enabled else ''}, "
        f"run dir {run_dir}"
    )
    evaluate = Evaluator(cfg, tokenizer, eval_tables, stores, device, console)
    checkpoint = CheckpointWriter(cfg, run_dir, tokenizer, batches, evaluate)
    # every rank calls the hooks at the same steps (FSDP gathers weights there); only rank 0 evaluates,
    # writes checkpoints and logs
    result = trainer.fit(batches.epoch, len(batches), evaluate if eval_tables else None, checkpoint)
    return result, batches, trainer


def _start_run_dir(cfg: Config, run_dir: Path) -> Path | None:
    """A writable run directory with this config in it; returns the checkpoint to resume from, if any
    (a fresh run starts a fresh metrics log)."""
    _prepare_run_dir(run_dir)
    resume = _resume_point(cfg, run_dir)
    if resume is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    return resume


def _tokenizer(
    cfg: Config,
    data: Any,
    resume: Path | None,
    start: tuple | None,
    pretrained: Path | None,
    teacher: TextTokenizer | None,
) -> TextTokenizer:
    """The resumed run's, the starting checkpoint's, the teacher's, the pretrained text tower's, a file's,
    or one trained on the captions."""
    tk = cfg.tokenizer
    if resume is not None:
        return TextTokenizer.load(resume, tk.context_length)
    if start is not None:
        return start[1]
    if teacher is not None:
        return teacher
    if pretrained is not None:
        return TextTokenizer.load(pretrained / "tokenizer.json", tk.context_length)
    if tk.path:
        return TextTokenizer.load(tk.path, tk.context_length)
    return TextTokenizer.train(data.captions(), tk.vocab_size, tk.context_length)


def _build_model(
    cfg: Config, data: Any, resume: Path | None
) -> tuple[TextTokenizer, DualEncoder, Any, DualEncoder | None]:
    """Tokenizer, model (new, or `model.init_from` to fine-tune), objective and the frozen teacher of
    objectives that distil from the starting model."""
    t = cfg.train
    pretrained = resolve_pretrained(cfg.model.text_pretrained) if cfg.model.text_pretrained else None
    start = load_checkpoint(cfg.model.init_from) if cfg.model.init_from else None  # fine-tune / refine
    objective = build_objective(t.objective, **t.objective_args)
    teacher, teacher_tokens = None, None
    if t.teacher:  # distillation: a frozen teacher, whose tokenizer the student uses
        teacher, teacher_tokens = load_teacher(
            t.teacher, t.objective, objective_needs(objective), cfg.tokenizer.context_length
        )
    check_not_adapted(start and start[0], "model.init_from")
    check_not_adapted(teacher, "train.teacher")
    tokenizer = _tokenizer(cfg, data, resume, start, pretrained, teacher_tokens)
    if teacher_tokens is not None and start is not None:
        check_same_tokenizer(teacher_tokens, start[1], "model.init_from")
    if teacher_tokens is not None and pretrained is not None:
        own = TextTokenizer.load(pretrained / "tokenizer.json", cfg.tokenizer.context_length)
        check_same_tokenizer(teacher_tokens, own, "model.text_pretrained")
    if start is not None:
        model = start[0].train()
        fresh_decoder = attach_captioner(model, objective_needs(objective), cfg.model.overrides)
        attach_matcher(model, objective_needs(objective), cfg.model.overrides)
        if teacher is None and requires(objective_needs(objective), "teacher"):  # CLIP-Refine distils from it
            teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen starting model
    else:
        model, fresh_decoder = _new_model(cfg, tokenizer, objective, pretrained, resume), True
    prepare_clips(model, objective, data, cfg)  # a temporal head, the clips' frame count, script checks
    check_patch_tokens(objective_needs(objective), not model.spec.vision_attn_pool, t.objective)
    model.lock("text", t.lock_text)
    model.lock("image", t.lock_image)
    prepare_text_only(model, objective, tokenizer, data, cfg, resume)  # capdec: locks, noise σ
    prepare_prefix(model, objective, tokenizer, data, cfg, resume, fresh_decoder)  # text_lm, connector
    if hasattr(objective, "bind_tokenizer"):  # LexLIP's masked stage: [MASK], special and word pieces
        objective.bind_tokenizer(tokenizer)
    if hasattr(model.visual, "frozen_bn_stats"):  # a timm trunk: BatchNorm statistics (train.freeze_bn_stats)
        model.visual.frozen_bn_stats = t.freeze_bn_stats
        model.train(model.training)
    model.set_checkpointing(
        t.grad_checkpointing in ("image", "both"), t.grad_checkpointing in ("text", "both")
    )
    if t.compile:
        model.compile_towers()
    return tokenizer, model, objective, teacher


def _resume(trainer: Trainer, batches: Any, resume: Path, run_dir: Path) -> None:
    """The loop state, the data stream position and skip counts; the log cut back to the checkpoint."""
    state = load_training_state(resume)
    try:
        trainer.load_training_state(state)
    except (ValueError, RuntimeError, KeyError) as e:  # optimizer groups or objective state of other settings
        raise UserError(
            f"The training state in {resume} does not fit this run's model and objective (a setting such as "
            "train.objective_args changed since it was saved); resume with the settings it was saved with, or "
            "start a new run (another train.output)."
        ) from e
    batches.load_state(state[1].get("data"))  # the stream position (shards) and skip counts
    trainer.last_checkpoint = resume
    _truncate_metrics(run_dir / "metrics.jsonl", trainer.step_count)
    console.print(f"resuming from {resume} (step {trainer.step_count})")
    if trainer.objective.state_dict() and not any(k.startswith("objective.") for k in state[0]):
        console.print(  # saved before this objective kept any state (e.g. ALIP before its moving means)
            f"[yellow]{resume} holds no state of objective '{trainer.cfg.objective}'[/]: it starts afresh."
        )


def _print_summary(result: TrainResult, skipped: Any, last_checkpoint: Path | None, run_dir: Path) -> None:
    if skip_summary(skipped):
        console.print(f"[yellow]{skip_summary(skipped)}[/]")
    if result.interrupted:
        console.print(
            f"[yellow]interrupted at step {result.steps}[/]; checkpoint {last_checkpoint}; "
            "resume with --set train.resume=auto"
        )
    else:
        console.print(
            f"trained {result.steps} steps ({result.samples} samples) in {result.seconds / 60:.1f} min"
            f"{f', {result.faults} faulty steps skipped' if result.faults else ''}; "
            f"checkpoint: {run_dir / 'checkpoint'}"
        )
