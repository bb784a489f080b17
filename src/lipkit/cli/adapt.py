"""`lipkit adapt`: few-shot adaptation of a trained checkpoint (lipkit.adapt; docs/adapt.md)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import typer

from lipkit.cli.common import console

# composed image retrieval's options (pic2word, rtd)
BATCH_SIZE = typer.Option(
    256, "--batch-size", min=2, help="pic2word: images per step; rtd: text triplets per step."
)
PROMPT = typer.Option(
    "a photo of * that {}",
    "--prompt",
    help="pic2word, rtd: the composed query's wording ('*' the reference image's word, '{}' the words).",
)
NOISE = typer.Option(0.5, "--noise", help="rtd: scale ε of the noise on the reference caption.")
TAU = typer.Option(0.07, "--tau", help="rtd: temperature of the contrastive loss.")


def adapt(
    checkpoint: Path = typer.Argument(
        ..., help="The trained checkpoint directory to adapt (e.g. runs/demo/checkpoint)."
    ),
    out: Path = typer.Argument(
        ..., help="Run directory for the adapted checkpoint: OUT/checkpoint, an ordinary lipkit checkpoint."
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Labelled table the shots are drawn from (e.g. the training table); pic2word: any table (its "
        "images); rtd: a table naming composed queries (`lipkit data build composed`'s train.jsonl).",
    ),
    column: str = typer.Option(
        None, "--column", help="The class column of the table (e.g. subcategory); not for pic2word / rtd."
    ),
    shots: int = typer.Option(16, "--shots", "-k", min=1, help="Images per class (K)."),
    seed: int = typer.Option(
        0,
        "--seed",
        help="Seed of the shots drawn and of the initialisation (LoRA's A, a random CoOp context, CLIP-Adapter).",
    ),
    split: str = typer.Option(
        "all", "--classes", help="all, base (the first half of the sorted classes, as CoOp) or novel."
    ),
    method: str = typer.Option(
        "lora",
        "--method",
        help="lora (low-rank branches merged into a tower), coop (learned prompt context), clip-adapter "
        "(residual MLP on image features), tip (Tip-Adapter's training-free cache of the shots) or tip-f "
        "(the cache's keys fine-tuned); for composed image retrieval, pic2word (a mapping network turning "
        "an image into a word, trained on images alone) or rtd (RTD: the text tower of a pic2word checkpoint "
        "tuned on text triplets).",
    ),
    steps: int = typer.Option(
        None, "--steps", min=0, help="AdamW steps (default 100, full-batch; pic2word 300, rtd 200; tip none)."
    ),
    lr: float = typer.Option(None, "--lr", help="Learning rate (default 1e-3; pic2word 1e-4, rtd 1e-5)."),
    towers: str = typer.Option("text", "--towers", help="lora: text, image (lipkit's ViT only) or both."),
    rank: int = typer.Option(4, "--rank", min=1, help="lora: rank r."),
    alpha: float = typer.Option(8.0, "--alpha", help="lora: scale α (the branch is multiplied by α / r)."),
    context: int = typer.Option(
        0, "--context", min=0, help="coop: context vectors M (0: as many as --context-init has tokens)."
    ),
    context_init: str = typer.Option(
        "a photo of a",
        "--context-init",
        help="coop: phrase whose word embeddings start the context ('' = random).",
    ),
    class_specific: bool = typer.Option(
        False, "--class-specific", help="coop: one context per class (CoOp's CSC) instead of one shared."
    ),
    reduction: int = typer.Option(4, "--reduction", min=1, help="clip-adapter: bottleneck reduction."),
    ratio: float = typer.Option(
        0.2, "--ratio", help="clip-adapter: residual ratio α of the adapted feature."
    ),
    tip_alpha: float = typer.Option(1.0, "--tip-alpha", help="tip, tip-f: weight α of the cache's logits."),
    tip_beta: float = typer.Option(
        1.0, "--tip-beta", help="tip, tip-f: sharpness β of the cache's affinity."
    ),
    batch_size: int = BATCH_SIZE,
    prompt: str = PROMPT,
    noise: float = NOISE,
    tau: float = TAU,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty OUT."),
) -> None:
    """Adapt a checkpoint to a labelled column with K images per class: LoRA merged into a tower, CoOp's
    learned prompt context, CLIP-Adapter or Tip-Adapter(-F), trained with the zero-shot classifier's
    cross-entropy; or teach it composed image retrieval (search with an image plus words) with Pic2Word,
    then RTD. OUT/checkpoint is a lipkit checkpoint that `lipkit eval`, `embed` and `serve` read
    (docs/adapt.md says what each method's export carries)."""
    from lipkit.adapt.run import AdaptSettings, adapt_checkpoint

    given = locals()
    settings = {f.name: given[f.name] for f in fields(AdaptSettings) if f.name in given}
    info = adapt_checkpoint(checkpoint, data, column, out, overwrite, **settings)
    print(json.dumps(info))
    console.print(f"adapted checkpoint: {out / 'checkpoint'}")
