"""`lipkit adapt`: few-shot adaptation of a trained checkpoint (lipkit.adapt; docs/adapt.md)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import typer

from lipkit.cli.common import console

# composed image retrieval's options (pic2word, rtd)
BATCH_SIZE = typer.Option(
    None,
    "--batch-size",
    min=2,
    help="pic2word: images per step; rtd: text triplets per step; omniview: objects per step (256 each); "
    "ptunifier: pairs per step (64).",
)
PROMPT = typer.Option(
    "a photo of * that {}",
    "--prompt",
    help="pic2word, rtd: the composed query's wording ('*' the reference image's word, '{}' the words).",
)
NOISE = typer.Option(0.5, "--noise", help="rtd: scale ε of the noise on the reference caption.")
TAU = typer.Option(0.07, "--tau", help="rtd: temperature of the contrastive loss.")
# GRAM's (gram-meta, gram) and Omniview's options
META = typer.Option(
    "", "--meta", help="gram: the run directory of `--method gram-meta` (its gram.pt) to start from."
)
REGULATE = typer.Option(
    True,
    "--regulate/--no-regulate",
    help="gram: step the context with the meta-learned gradient regulator (θ − lr·ψ(∇L), by default the "
    "meta-training's inner steps at its α), or with AdamW from the meta-learned start only.",
)
INNER_LR = typer.Option(
    1.0, "--inner-lr", min=0.0, help="gram-meta: α of the regulated inner step θ − α·ψ(∇L)."
)
INNER_STEPS = typer.Option(1, "--inner-steps", min=1, help="gram-meta: inner steps on each support task.")
TASKS = typer.Option(4, "--tasks", min=1, help="gram-meta: (support, query) task pairs per meta-step.")
WAYS = typer.Option(
    16, "--ways", min=2, help="gram-meta: captions (concepts) per task; its shots are --shots."
)
DOMAINS = typer.Option(
    8,
    "--domains",
    min=2,
    help="gram-meta: domains the captions are clustered into (support and query differ).",
)
VIEW_WEIGHT = typer.Option(
    1.0, "--view-weight", min=0.0, help="omniview: weight λ of the worst-view-to-anchor term."
)

# PTUnifier's
POOL = typer.Option(2048, "--pool", min=1, help="ptunifier: vectors in each pseudo-token pool.")
PSEUDO_IMAGE = typer.Option(
    49, "--pseudo-image", min=1, help="ptunifier: pseudo image tokens that stand in for a missing image."
)
PSEUDO_TEXT = typer.Option(
    32, "--pseudo-text", min=1, help="ptunifier: pseudo caption tokens that stand in for a missing caption."
)
FREEZE_POOLS = typer.Option(
    False,
    "--freeze-pools",
    help="ptunifier: keep the pools at their random start (the reference code's; by default they train).",
)
MASK_RATIO = typer.Option(
    0.75, "--mask-ratio", help="ptunifier: fraction of image tokens masked in the image-only term."
)

DATA_OPTION = typer.Option(
    ...,
    "--data",
    help="Labelled table the shots are drawn from (e.g. the training table); pic2word: any table (its "
    "images); rtd: a table naming composed queries (`lipkit data build composed`'s train.jsonl); "
    "ptunifier: any image-caption table.",
)
COLUMN_OPTION = typer.Option(
    None,
    "--column",
    help="The class column of the table (e.g. subcategory); omniview: the column naming the object each "
    "row is a view of (e.g. concept); not for gram-meta, pic2word, rtd, ptunifier.",
)
SHOTS_OPTION = typer.Option(16, "--shots", "-k", min=1, help="Images per class (K).")
SEED_OPTION = typer.Option(
    0,
    "--seed",
    help="Seed of the shots drawn and of the initialisation (LoRA's A, a random CoOp or gram-meta context, "
    "CLIP-Adapter, omniview's adapter, ptunifier's pools and head), and of gram-meta's tasks, omniview's "
    "batches and ptunifier's batches and masks.",
)
SPLIT_OPTION = typer.Option(
    "all", "--classes", help="all, base (the first half of the sorted classes, as CoOp) or novel."
)
METHOD_OPTION = typer.Option(
    "lora",
    "--method",
    help="lora (low-rank branches merged into a tower), coop (learned prompt context), clip-adapter "
    "(residual MLP on image features), tip (Tip-Adapter's training-free cache of the shots) or tip-f "
    "(the cache's keys fine-tuned), gram-meta (GRAM: meta-train a prompt context and a gradient regulator "
    "on an image-text table; writes OUT/gram.pt), gram (CoOp from that context, regulated steps), "
    "omniview (an image adapter tuned so the views of one object, grouped by --column, agree), ptunifier "
    "(PTUnifier: pseudo-token pools so the matching head fuses image-only, caption-only or paired input, "
    "trained on the table's pairs); for composed image retrieval, pic2word (a mapping network turning "
    "an image into a word, trained on images alone) or rtd (RTD: the text tower of a pic2word checkpoint "
    "tuned on text triplets).",
)
STEPS_OPTION = typer.Option(
    None,
    "--steps",
    min=0,
    help="Steps (default 100, full-batch; pic2word 300, rtd 200, gram-meta and omniview 200, ptunifier 300; gram with --regulate: the meta-training's inner steps; tip none).",
)
LR_OPTION = typer.Option(
    None,
    "--lr",
    help="Learning rate (default 1e-3; pic2word and ptunifier 1e-4, rtd 1e-5; gram with --regulate: the meta-training's α).",
)
TOWERS_OPTION = typer.Option("text", "--towers", help="lora: text, image (lipkit's ViT only) or both.")
RANK_OPTION = typer.Option(4, "--rank", min=1, help="lora: rank r.")
ALPHA_OPTION = typer.Option(8.0, "--alpha", help="lora: scale α (the branch is multiplied by α / r).")
CONTEXT_OPTION = typer.Option(
    0, "--context", min=0, help="coop: context vectors M (0: as many as --context-init has tokens)."
)
CONTEXT_INIT_OPTION = typer.Option(
    "a photo of a",
    "--context-init",
    help="coop: phrase whose word embeddings start the context ('' = random).",
)
CLASS_SPECIFIC_OPTION = typer.Option(
    False, "--class-specific", help="coop: one context per class (CoOp's CSC) instead of one shared."
)
REDUCTION_OPTION = typer.Option(4, "--reduction", min=1, help="clip-adapter: bottleneck reduction.")
RATIO_OPTION = typer.Option(0.2, "--ratio", help="clip-adapter: residual ratio α of the adapted feature.")
TIP_ALPHA_OPTION = typer.Option(1.0, "--tip-alpha", help="tip, tip-f: weight α of the cache's logits.")
TIP_BETA_OPTION = typer.Option(1.0, "--tip-beta", help="tip, tip-f: sharpness β of the cache's affinity.")
OVERWRITE_OPTION = typer.Option(False, "--overwrite", help="Write into a non-empty OUT.")


def adapt(
    checkpoint: Path = typer.Argument(
        ..., help="The trained checkpoint directory to adapt (e.g. runs/demo/checkpoint)."
    ),
    out: Path = typer.Argument(
        ..., help="Run directory for the adapted checkpoint: OUT/checkpoint, an ordinary lipkit checkpoint."
    ),
    data: Path = DATA_OPTION,
    column: str = COLUMN_OPTION,
    shots: int = SHOTS_OPTION,
    seed: int = SEED_OPTION,
    split: str = SPLIT_OPTION,
    method: str = METHOD_OPTION,
    steps: int = STEPS_OPTION,
    lr: float = LR_OPTION,
    towers: str = TOWERS_OPTION,
    rank: int = RANK_OPTION,
    alpha: float = ALPHA_OPTION,
    context: int = CONTEXT_OPTION,
    context_init: str = CONTEXT_INIT_OPTION,
    class_specific: bool = CLASS_SPECIFIC_OPTION,
    reduction: int = REDUCTION_OPTION,
    ratio: float = RATIO_OPTION,
    tip_alpha: float = TIP_ALPHA_OPTION,
    tip_beta: float = TIP_BETA_OPTION,
    batch_size: int = BATCH_SIZE,
    prompt: str = PROMPT,
    noise: float = NOISE,
    tau: float = TAU,
    meta: str = META,
    regulate: bool = REGULATE,
    inner_lr: float = INNER_LR,
    inner_steps: int = INNER_STEPS,
    tasks: int = TASKS,
    ways: int = WAYS,
    domains: int = DOMAINS,
    view_weight: float = VIEW_WEIGHT,
    pool: int = POOL,
    pseudo_image: int = PSEUDO_IMAGE,
    pseudo_text: int = PSEUDO_TEXT,
    mask_ratio: float = MASK_RATIO,
    freeze_pools: bool = FREEZE_POOLS,
    overwrite: bool = OVERWRITE_OPTION,
) -> None:
    """Adapt a checkpoint to a labelled column with K images per class: LoRA merged into a tower, CoOp's
    learned prompt context (GRAM: from a meta-learned start), CLIP-Adapter or Tip-Adapter(-F), trained with the zero-shot classifier's
    cross-entropy; or teach it composed image retrieval (search with an image plus words) with Pic2Word,
    then RTD; or PTUnifier's pools, so one fused feature serves image-only, caption-only and paired input.
    OUT/checkpoint is a lipkit checkpoint that `lipkit eval`, `embed` and `serve` read
    (docs/adapt.md says what each method's export carries)."""
    from lipkit.adapt.run import AdaptSettings, adapt_checkpoint

    given = locals()
    settings = {f.name: given[f.name] for f in fields(AdaptSettings) if f.name in given}
    info = adapt_checkpoint(checkpoint, data, column, out, overwrite, **settings)
    print(json.dumps(info))
    if method == "gram-meta":
        console.print(
            f"meta-trained context and regulator: {out / 'gram.pt'} (pass --meta {out} to --method gram)"
        )
    else:
        console.print(f"adapted checkpoint: {out / 'checkpoint'}")
