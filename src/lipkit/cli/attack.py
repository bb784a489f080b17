"""`lipkit attack`: a split's metrics under adversarial images (lipkit.attack; docs/robustness.md)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import typer

from lipkit.cli.common import console
from lipkit.errors import UserError

METRICS = ("zeroshot/{column}/top1", "retrieval/text_to_image/R@1", "retrieval/image_to_text/R@1")


def _fraction(text: str, name: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{name} must be a number or a fraction such as 2/255, not '{text}'.") from None


def attack(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to attack (e.g. runs/demo/checkpoint)."),
    source: str = typer.Argument(..., help="The split whose images are perturbed (e.g. test-style.jsonl)."),
    out: Path = typer.Argument(
        ..., help="Folder for attack.json (clean and attacked metrics, success rate)."
    ),
    method: str = typer.Option(
        "pgd",
        "--method",
        help="pgd: white-box projected gradient ascent per image; sga: SGA's set-level guidance (texts and "
        "scales) for attacks that transfer; uap: one universal perturbation for every image, learned on --train "
        "with C-PGC's contrastive loss (compared with random noise of the same ε); words: replace caption words "
        "by their nearest vocabulary words (text→image retrieval, --task retrieval).",
    ),
    task: str = typer.Option(
        "zeroshot",
        "--task",
        help="zeroshot: ascend the zero-shot loss of --column; retrieval: push each image from its captions.",
    ),
    column: str = typer.Option("subcategory", "--column", help="zeroshot: the class column."),
    eps: str = typer.Option("2/255", "--eps", help="Budget ε as a fraction of the pixel range (0 = clean)."),
    norm: str = typer.Option("linf", "--norm", help="linf (each pixel within ε) or l2 (the image's norm)."),
    steps: int | None = typer.Option(
        None, "--steps", help="pgd, sga: ascent steps (10); uap: training batches (200)."
    ),
    step_size: str = typer.Option(
        "", "--step-size", help="Step α (pgd: ε/4, for linf at least 1/255; sga: 0.5/255; uap: ε/8)."
    ),
    train: str = typer.Option("", "--train", help="uap: the table the perturbation is learned on."),
    gallery: int = typer.Option(12, "--gallery", help="Clean/adversarial pairs shown in OUT/report.html."),
    words: int = typer.Option(1, "--words", help="words: words changed per caption at most."),
    candidates: int = typer.Option(
        10, "--candidates", help="words: nearest vocabulary words tried per word."
    ),
    transfer: list[str] = typer.Option(
        [], "--transfer", help="Another checkpoint to score the same adversarial images on (repeatable)."
    ),
    save_images: bool = typer.Option(
        False,
        "--save-images",
        help="Also write the adversarial split: OUT/adversarial/*.png, OUT/adversarial.jsonl.",
    ),
    limit: int = typer.Option(0, "--limit", help="Attack this many images spread over the split (0: all)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per attack batch (and eval batch)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random starts."),
) -> None:
    """Perturb a split's images (PGD, SGA, one universal perturbation) or its captions (words) and report its
    metrics clean and under attack, on this checkpoint and any --transfer ones, with a gallery of
    clean/adversarial pairs in OUT/report.html (docs/robustness.md)."""
    from lipkit.attack.run import attack_split

    alpha = _fraction(step_size, "--step-size") if step_size else None
    result = attack_split(
        checkpoint,
        source,
        out,
        method=method,
        task=task,
        column=column,
        eps=_fraction(eps, "--eps"),
        norm=norm,
        steps=steps,
        step_size=alpha,
        limit=limit,
        batch_size=batch_size,
        seed=seed,
        train=train,
        gallery=gallery,
        transfer=list(transfer),
        save_images=save_images,
        words=words,
        candidates=candidates,
    )
    _show(result, column, out)


def _show(result: dict, column: str, out: Path) -> None:
    """One JSON line of the headline metrics (clean, attacked[, random]) and success rates, one per transfer
    target."""
    names = [n for n in ("clean", "attacked", "random") if n in result]
    shown = {}
    for key in (m.format(column=column) for m in METRICS):
        if key in result["clean"]:
            shown[key] = [round(result[n][key], 4) for n in names]
    rates = {
        k: None if result[k] is None else round(result[k], 4) for k in result if k.endswith("success_rate")
    }
    print(json.dumps({"images": result["images"], **rates, **shown}))
    for t in result["transfer"]:
        moved = {k: [round(t["clean"][k], 4), round(t["attacked"][k], 4)] for k in shown if k in t["clean"]}
        print(json.dumps({"transfer": t["checkpoint"], "success_rate": t["success_rate"], **moved}))
    console.print(f"[bold]{' → '.join(names)}[/] written to {out / 'attack.json'} and {out / 'report.html'}")


def harden(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to fine-tune (e.g. runs/demo/checkpoint)."),
    out: Path = typer.Argument(..., help="Run folder: the hardened checkpoint goes to OUT/checkpoint."),
    data: str = typer.Option(..., "--data", help="The table whose images it trains on (e.g. train.jsonl)."),
    method: str = typer.Option(
        "tecoa",
        "--method",
        help="tecoa: the zero-shot cross-entropy of --column's classes under attack (needs labels); "
        "fare: keep each image's embedding where it was, under attack (no labels; docs/robustness.md has "
        "what it did at this budget).",
    ),
    eps: str = typer.Option(
        "2/255", "--eps", help="ℓ∞ budget trained against (a fraction of the pixel range)."
    ),
    attack_steps: int = typer.Option(5, "--attack-steps", help="PGD steps of the inner attack (papers: 10)."),
    step_size: str = typer.Option(
        "", "--step-size", help="The inner attack's step (default max(ε/4, 1/255))."
    ),
    steps: int = typer.Option(200, "--steps", help="Fine-tuning steps."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate of the image tower."),
    column: str = typer.Option("subcategory", "--column", help="tecoa: the class column."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batches and the attack's random starts."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT/checkpoint."),
) -> None:
    """Adversarially fine-tune a checkpoint's image tower (FARE or TeCoA; docs/robustness.md), then measure it
    with `lipkit attack OUT/checkpoint ...`."""
    from lipkit.attack.harden import harden_checkpoint

    record = harden_checkpoint(
        checkpoint,
        data,
        out,
        overwrite,
        method=method,
        eps=_fraction(eps, "--eps"),
        attack_steps=attack_steps,
        step_size=_fraction(step_size, "--step-size") if step_size else None,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        column=column,
        seed=seed,
    )
    first, last = record["loss"][0], record["loss"][-1]
    print(json.dumps({"method": method, "steps": steps, "loss_first_step": first, "loss_last_step": last}))
    console.print(f"[bold]hardened checkpoint[/] written to {out / 'checkpoint'}")
