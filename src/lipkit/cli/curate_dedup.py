"""`lipkit data dedup` (registered on the `lipkit data` app by `register(app)`), and what `lipkit data build
noisy` prints. Each parses its options, calls one library function and prints a summary."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from lipkit.cli.curate_score import CAPTION_COLUMN, DEVICE, IMAGE_COLUMN, SOURCE_HELP

console = Console(stderr=True)


def build_noisy(
    source: Path | None,
    out: Path | None,
    mispaired: float,
    duplicates: float,
    jpeg_quality: int,
    seed: int,
    force: bool,
) -> None:
    """`lipkit data build noisy` (its options are parsed by `lipkit data build`)."""
    from lipkit.data.builtin.noisy import build_noisy as build
    from lipkit.data.builtin.noisy import default_out

    s = build(
        source,
        out,
        mispaired=mispaired,
        duplicates=duplicates,
        jpeg_quality=jpeg_quality,
        seed=seed,
        force=force,
    )
    where = Path(out) if out is not None else default_out()
    if s.get("note"):
        console.print(f"[yellow]{s['note']}[/]")
    console.print(
        f"[bold green]noisy table[/] {where / 'train.jsonl'}: {s['rows']} rows from {s['source_rows']} "
        f"({s['mispaired']} mispaired, {s['copies']} copies of which {s['reencoded']} re-encoded as JPEG); "
        f"the truth is in {where / 'truth.jsonl'}"
    )


def dedup(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(..., help="Output folder: train.jsonl (or shards/), dedup_report.json."),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="Find near-duplicate images with this checkpoint's image embeddings."
    ),
    embeddings: Path = typer.Option(
        None,
        "--embeddings",
        help="SOURCE's image embeddings: a folder `lipkit embed CHECKPOINT SOURCE DIR` wrote (reused), or where "
        "to write them (default OUT/embeddings; an interrupted run resumes there).",
    ),
    neighbours: int = typer.Option(
        20,
        "--neighbours",
        help="Candidates per image: its nearest images (0: every pair above --min-similarity).",
    ),
    min_similarity: float = typer.Option(
        0.4, "--min-similarity", help="Candidates need at least this cosine similarity of image embeddings."
    ),
    max_pixel_distance: float = typer.Option(
        11.0,
        "--max-pixel-distance",
        help="A candidate is a duplicate when no 2x2 patch differs by more than this in brightness, nor 4x4 in "
        "colour (8-bit levels, at 32 px; the 2 worst patches ignored).",
    ),
    captions: bool = typer.Option(
        False,
        "--captions",
        help="Also drop rows whose caption set repeats an earlier row's (case, spaces ignored).",
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass (embedding)."),
    device: str = DEVICE,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> None:
    """Drop repeated images (exact pixels; with --checkpoint also near-duplicates confirmed by a pixel check)
    and, with --captions, repeated caption sets; keep the first of each group. OUT/dedup_report.json lists
    every dropped row, the row it repeats and why."""
    from lipkit.curate.dedup import REPORT, run_dedup

    s = run_dedup(
        source,
        out,
        checkpoint=checkpoint,
        embeddings=embeddings,
        neighbours=neighbours,
        min_similarity=min_similarity,
        max_pixel_distance=max_pixel_distance,
        captions=captions,
        image_column=image_column,
        caption_column=caption_column,
        batch_size=batch_size,
        device=device,
    )
    if s["undecodable"]:
        console.print(
            f"[yellow]{len(s['undecodable'])} image(s) could not be decoded; kept, listed in {REPORT}[/]"
        )
    why = ", ".join(f"{n} {reason}" for reason, n in s["dropped"].items() if n) or "none"
    console.print(
        f"[bold green]kept[/] {s['kept']} of {s['rows']} rows (dropped: {why}) → {Path(out) / (s['output'] or '')}; "
        f"the dropped rows are listed in {Path(out) / REPORT}"
    )


def register(app: typer.Typer) -> None:
    """Add dedup to the `lipkit data` app."""
    app.command("dedup")(dedup)
