"""`lipkit data score | filter`: registered on the `lipkit data` app by `register(app)`. Each command parses
its options, calls one function of `lipkit.curate` and prints what it did."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)

SOURCE_HELP = (
    "Any source `data.train` accepts: a CSV/TSV/JSONL table, .parquet, WebDataset shards (a .tar, a folder "
    "of them or a brace pattern), a folder of images with .txt/.json captions, a saved Hugging Face dataset."
)

# options every curation command shares (one OptionInfo each; typer only reads them)
DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")
IMAGE_COLUMN = typer.Option("image", help="Table column naming the image (a path, or bytes inline).")
CAPTION_COLUMN = typer.Option("captions", help="Table column holding the caption(s).")


def score(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(
        ..., help="Output folder: scored.jsonl (or shards/ for inline images), score.json, skipped.json."
    ),
    embeddings: Path = typer.Option(
        None,
        "--embeddings",
        help="Reuse the image embeddings of a folder `lipkit embed CHECKPOINT SOURCE DIR` wrote (same "
        "checkpoint); images it lacks are embedded here.",
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images (and captions) per forward pass."),
    chunk_size: int = typer.Option(2048, "--chunk-size", help="Pairs per saved chunk (the unit of resume)."),
    workers: int = typer.Option(0, "--workers", "-w", help="Image-decoding worker processes."),
    device: str = DEVICE,
    truth: Path = typer.Option(
        None,
        "--truth",
        help="A JSONL file of {key, mispaired} (the truth.jsonl of `lipkit data build noisy`): prints the "
        "AUC of clip_score at ranking the true pairs above the mispaired ones.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the scores already in OUT."),
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
    image_root: str = typer.Option("", help="Folder image paths are relative to (default: the table's)."),
) -> None:
    """CLIP score of every image–caption pair (cosine similarity; clip_score: the best caption's).

    One score per caption in clip_scores. The source is streamed in chunks; rerun the same command to
    resume after an interruption."""
    from lipkit.curate.score import run_score

    r = run_score(
        checkpoint,
        source,
        out,
        embeddings=embeddings,
        device=device,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        truth=truth,
        overwrite=overwrite,
        image_column=image_column,
        caption_column=caption_column,
        image_root=image_root,
    )
    if r.chunks_computed == 0 and r.chunks_done_before == 0:
        console.print(f"'{r.out}' is already complete; nothing to do.")
    elif r.chunks_done_before:
        console.print(f"resumed: {r.chunks_done_before} chunk(s) were already scored")
    lost = sum(r.skipped.values())
    if lost:
        why = ", ".join(f"{n} {escape(k)}" for k, n in r.skipped.items())
        console.print(f"[yellow]left out {lost} pair(s) ({why}); see {r.out / 'skipped.json'}[/]")
    st = r.stats
    console.print(
        f"CLIP score of {r.scored} pairs ({r.captions} captions): mean {st['mean']:.3f}, "
        f"p10 {st['p10']:.3f}, median {st['p50']:.3f}, p90 {st['p90']:.3f}"
    )
    if r.truth is not None:
        t = r.truth
        console.print(
            f"AUC, true vs mispaired pairs: {t['auc']:.4f} ({t['pairs']} pairs, {t['mispaired']} mispaired)"
        )
    console.print(
        f"[bold green]scored[/] → {r.out / r.output}; keep the best with `lipkit data filter {r.out} OUT "
        "--keep-fraction 0.7`"
    )


def filter_(
    scored: str = typer.Argument(
        ..., help="A `lipkit data score` OUT folder, or any source with a clip_score column."
    ),
    out: Path = typer.Argument(
        ..., help="Output folder: filtered.jsonl (or shards/), filter.json, dropped.jsonl."
    ),
    min_score: float = typer.Option(None, "--min-score", help="Keep pairs whose clip_score is at least X."),
    keep_fraction: float = typer.Option(
        None, "--keep-fraction", help="Keep the best fraction F of the pairs (0 < F ≤ 1)."
    ),
    per_cluster: Path = typer.Option(
        None,
        "--per-cluster",
        help="With --keep-fraction: keep the best F of every cluster of this `lipkit data cluster` folder "
        "(at least one each), so that rare concepts survive.",
    ),
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> None:
    """Keep pairs by CLIP score: a threshold, or the top fraction (overall or per cluster).

    Writes a new table (new shards for shards), never touching the input; the dropped pairs are listed
    in OUT/dropped.jsonl."""
    from lipkit.curate.filter import run_filter

    s = run_filter(
        scored,
        out,
        min_score=min_score,
        keep_fraction=keep_fraction,
        per_cluster=per_cluster,
        image_column=image_column,
        caption_column=caption_column,
    )
    _print_filter(s, out)


def _print_filter(s: dict, out: Path) -> None:
    import json

    t = Table(title="filter", show_header=True)
    for col in ("", "pairs", "share", "score min", "mean", "max"):
        t.add_column(col, justify="right" if col else "left")
    for name, n, r in (("kept", s["kept"], s["kept_scores"]), ("dropped", s["dropped"], s["dropped_scores"])):
        cells = [f"{r[k]:.3f}" for k in ("min", "mean", "max")] if r else ["", "", ""]
        t.add_row(name, str(n), f"{100 * n / s['pairs']:.1f}%", *cells)
    Console().print(t)
    if "clusters" in s:
        c = s["clusters"]
        console.print(f"per cluster: {c['clusters']} clusters, {c['unclustered_pairs']} pairs in no cluster")
    lowest = [json.loads(x) for x in (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    for row in lowest:
        key = row["key"] if len(row["key"]) <= 40 else "…" + row["key"][-39:]
        console.print(
            f"  dropped {row['clip_score']:.3f}  {escape(row['caption'][:60])}  [dim]{escape(key)}[/]"
        )
    if s["unreadable"]:
        console.print(f"[yellow]{s['unreadable']} pair(s) could not be read and are not in the output[/]")
    console.print(f"[bold green]kept[/] {s['written']} pairs → {out / s['output']}")


def register(app: typer.Typer) -> None:
    """Add score and filter to the `lipkit data` app."""
    app.command("score")(score)
    app.command("filter")(filter_)
