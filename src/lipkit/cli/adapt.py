"""`lipkit adapt`: few-shot adaptation of a trained checkpoint (lipkit.adapt; docs/adapt.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lipkit.cli.common import console


def adapt(
    checkpoint: Path = typer.Argument(
        ..., help="The trained checkpoint directory to adapt (e.g. runs/demo/checkpoint)."
    ),
    out: Path = typer.Argument(
        ..., help="Run directory for the adapted checkpoint: OUT/checkpoint, an ordinary lipkit checkpoint."
    ),
    data: Path = typer.Option(
        ..., "--data", help="Labelled table the shots are drawn from (e.g. the training table)."
    ),
    column: str = typer.Option(..., "--column", help="The class column of the table (e.g. subcategory)."),
    shots: int = typer.Option(16, "--shots", "-k", min=1, help="Images per class (K)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shots drawn and of the LoRA initialisation."),
    split: str = typer.Option(
        "all", "--classes", help="all, base (the first half of the sorted classes, as CoOp) or novel."
    ),
    method: str = typer.Option("lora", "--method", help="lora (the only method so far)."),
    towers: str = typer.Option("text", "--towers", help="text, image (lipkit's ViT only) or both."),
    rank: int = typer.Option(4, "--rank", min=1, help="LoRA rank r."),
    alpha: float = typer.Option(8.0, "--alpha", help="LoRA scale α (the branch is multiplied by α / r)."),
    steps: int = typer.Option(100, "--steps", min=0, help="Full-batch AdamW steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty OUT."),
) -> None:
    """Adapt a checkpoint to a labelled column with K images per class: LoRA on the chosen towers, trained
    with the zero-shot classifier's cross-entropy over the class prompts, then merged into the weights. OUT
    is an ordinary checkpoint: `lipkit eval`, `embed`, `serve` and every export read it."""
    from lipkit.adapt.run import adapt_checkpoint
    from lipkit.errors import UserError

    if method != "lora":
        raise UserError(f"Adaptation method '{method}' is not implemented; use --method lora.")
    info = adapt_checkpoint(
        checkpoint, data, column, out, shots, seed, split, towers, rank, alpha, steps, lr, overwrite=overwrite
    )
    print(json.dumps(info))
    console.print(f"adapted checkpoint: {out / 'checkpoint'}")
