"""The `lipkit` command line: one module per command group, each thin (parse, load a config, call one
library function). This module assembles them and runs the app (`main`)."""

from __future__ import annotations

import os
import sys

import typer

from lipkit import __version__
from lipkit.cli import adapt as adapt_commands
from lipkit.cli import attack as attack_commands
from lipkit.cli import curate_cluster, curate_dedup, curate_score, data, data_build, interop, search
from lipkit.cli import eval as eval_commands
from lipkit.cli import train as train_commands
from lipkit.cli.common import console
from lipkit.errors import UserError

app = typer.Typer(
    help="lipkit: train, evaluate and serve CLIP-family image–text models.\n\n"
    "Start with `lipkit demo` (builds the emoji dataset, trains a tiny CLIP on the CPU, evaluates it and "
    "writes an HTML report), then `lipkit train --config configs/demo.yaml` on your own data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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


app.command()(train_commands.train)
app.command()(train_commands.refine)
app.command()(train_commands.distill)
app.command("eval")(eval_commands.eval_)
app.command()(eval_commands.report)
app.command()(eval_commands.caption)
app.command()(adapt_commands.adapt)
app.command()(attack_commands.attack)
app.command()(attack_commands.harden)
app.add_typer(data.app, name="data")
data_build.register(data.app)  # data build emoji | noisy | canvases
curate_cluster.register(data.app)  # data cluster, reduce, associate
curate_score.register(data.app)  # data score, filter
curate_dedup.register(data.app)  # data dedup
app.command()(train_commands.demo)
interop.register(app)  # checkpoint convert (and its old spelling `convert`), export onnx, quantize
search.register(app)  # embed, index, search, serve


def main() -> None:
    # OpenMP threads that spin while waiting steal the cores they share with data work and other jobs;
    # passive waiting measured 2.4–3× faster training on a shared 2-core machine (docs/benchmarks.md).
    # Set here, before any command imports torch (never at import of lipkit); the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except UserError as e:
        from rich.markup import escape  # brackets in a message (pip install 'lipkit[wandb]') stay text

        console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
