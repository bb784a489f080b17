"""`lipkit data build NAME` (registered on the `lipkit data` app by `register(app)`): the built-in datasets
and benchmarks. Each parses its options, calls one library function and prints a summary."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from lipkit.errors import UserError

console = Console(stderr=True)
BUILT_IN = ("emoji", "noisy", "canvases", "composed", "motion")


def build_canvases(
    out: Path | None,
    sources: dict[str, Path | None],
    size: int,
    objects: str,
    scale: str,
    max_overlap: float,
    counts: tuple[int, int],
    seed: int,
    force: bool,
) -> None:
    """`lipkit data build canvases`."""
    from lipkit.data.builtin.canvases import CanvasOptions, build_canvases, default_out, parse_range

    lo, hi = parse_range(objects, "--objects")
    smin, smax = parse_range(scale, "--scale", float)
    options = CanvasOptions(size, lo, hi, smin, smax, max_overlap, counts[0], counts[1], seed)
    s = build_canvases(out, sources, options, force=force)
    where = Path(out) if out is not None else default_out()
    console.print(
        f"[bold green]canvases[/] {where}: {s['canvases']['train']} training canvases "
        f"({s['objects']['train']} objects) in train.jsonl, {s['canvases']['test']} test canvases "
        f"({s['objects']['test']} objects) in test.jsonl; {size}×{size} px, boxes, masks and one caption per object"
    )


def build_composed_benchmark(out: Path | None, source: Path | None, force: bool) -> None:
    """`lipkit data build composed`."""
    from lipkit.data.builtin.composed import build_composed, default_out

    s = build_composed(out, source, force=force)
    where = Path(out) if out is not None else default_out()
    shown = ", ".join(
        f"{k}.jsonl {v['images']} images / {v['queries']} queries" for k, v in s["splits"].items()
    )
    console.print(f"[bold green]composed[/] {where}: {shown}")


def build_motion_clips(
    out: Path | None, sources: dict, size: int, frames: int, counts: tuple, seed: int, force: bool
) -> None:
    """`lipkit data build motion`."""
    from lipkit.data.builtin.motion import MotionOptions, build_motion, default_out

    s = build_motion(out, sources, MotionOptions(frames, size, counts[0], counts[1], seed), force=force)
    where = Path(out) if out is not None else default_out()
    console.print(
        f"[bold green]motion[/] {where}: {s['clips']['train']} training clips in train.jsonl, "
        f"{s['clips']['test']} test clips in test.jsonl; {frames} frames of {size}×{size} px each"
    )


def data_build(
    name: str = typer.Argument(..., help=f"Dataset to build; built in: {', '.join(BUILT_IN)}."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: the user cache dir)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a complete build exists."),
    seed: int = typer.Option(
        0, help="Seed of the novel-concept split (emoji), of the noise (noisy) or of the layouts (canvases)."
    ),
    source: Path = typer.Option(
        None,
        "--source",
        help="noisy: the captions table to copy (default: the emoji train table); canvases, motion: the table "
        "of objects for the training canvases / clips (default: the emoji train table); composed: the folder of the "
        "emoji tables (default: the emoji build).",
    ),
    test_source: Path = typer.Option(
        None,
        "--test-source",
        help="canvases, motion: the objects of the test canvases / clips (default: emoji test-style).",
    ),
    mispaired: float = typer.Option(
        0.3, "--mispaired", help="noisy: share of rows given another's captions."
    ),
    duplicates: float = typer.Option(0.1, "--duplicates", help="noisy: share of rows copied once more."),
    jpeg_quality: int = typer.Option(75, "--jpeg-quality", help="noisy: JPEG quality of re-encoded copies."),
    size: int = typer.Option(
        None, "--size", help="canvases: side of each canvas in pixels (256); motion: of each frame (128)."
    ),
    frames: int = typer.Option(8, "--frames", help="motion: frames per clip."),
    train_pairs: int = typer.Option(
        1600, "--train-pairs", help="motion: training pairs of clips (a motion and its time reverse)."
    ),
    test_objects: int = typer.Option(
        100, "--test-objects", help="motion: test objects, each with all ten motions."
    ),
    objects: str = typer.Option("2-4", "--objects", help="canvases: objects per canvas, MIN-MAX."),
    scale: str = typer.Option(
        "0.25-0.45", "--scale", help="canvases: an object's longer side as a fraction of the canvas, MIN-MAX."
    ),
    max_overlap: float = typer.Option(
        0.2, "--max-overlap", help="canvases: the most of one object's box another may cover."
    ),
    train_canvases: int = typer.Option(4000, "--train-canvases", help="canvases: training canvases."),
    test_canvases: int = typer.Option(1000, "--test-canvases", help="canvases: test canvases."),
) -> None:
    """Build a dataset. `emoji`: three artists' emoji sets from npm with captions in 9 languages; splits
    train / test-style (the third artist) / test-novel (unseen concepts). `noisy`: a copy of a captions
    table with mispaired captions and duplicate images injected, the truth in truth.jsonl beside it.
    `canvases`: a localisation benchmark — several objects of a table of cut-outs pasted on each canvas,
    with boxes, masks and one caption per object; train.jsonl from the training artists, test.jsonl from
    the held-out one. `composed`: composed image retrieval — the emoji tables as galleries whose rows name
    the queries they answer (a reference variant of the same concept + "with dark skin tone"). `motion`:
    clips of one object moving left/right/up/down, growing/shrinking, turning or turning into another, each
    pair of opposite motions the same frames in reverse order; train.jsonl from the training artists,
    test.jsonl (every motion of each object) from the held-out one."""
    if name == "noisy":
        from lipkit.cli.curate_dedup import build_noisy

        build_noisy(source, out, mispaired, duplicates, jpeg_quality, seed, force)
    elif name == "canvases":
        sources = {"train": source, "test": test_source}
        counts = (train_canvases, test_canvases)
        build_canvases(out, sources, size or 256, objects, scale, max_overlap, counts, seed, force)
    elif name == "motion":
        sources = {"train": source, "test": test_source}
        build_motion_clips(out, sources, size or 128, frames, (train_pairs, test_objects), seed, force)
    elif name == "composed":
        build_composed_benchmark(out, source, force)
    elif name == "emoji":
        from lipkit.data.emoji import build_emoji

        build_emoji(out, force=force, seed=seed)
    else:
        raise UserError(
            f"Unknown dataset '{name}'; the built-in ones are {', '.join(repr(b) for b in BUILT_IN)} "
            "(your own data needs no build)."
        )


def register(app: typer.Typer) -> None:
    app.command("build")(data_build)
