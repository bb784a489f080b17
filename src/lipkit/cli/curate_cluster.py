"""`lipkit data cluster | reduce | associate`: registered on the `lipkit data` app by `register(app)`.
Each command parses its options, calls one function of `lipkit.curate` and prints a summary."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lipkit.cli.curate_score import CAPTION_COLUMN, DEVICE, IMAGE_COLUMN, SOURCE_HELP

console = Console(stderr=True)


def cluster(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(
        ..., help="Output folder: clusters.jsonl, centroids.npy, cluster.json (and embeddings/)."
    ),
    k: int = typer.Option(..., "--k", "-k", min=1, help="Number of clusters."),
    embeddings: Path = typer.Option(
        None,
        "--embeddings",
        help="SOURCE's image embeddings: a folder `lipkit embed CHECKPOINT SOURCE DIR` wrote (reused), or "
        "where to write them (default OUT/embeddings; an interrupted run resumes there).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of k-means' initialisation and training sample."),
    niter: int = typer.Option(20, "--niter", min=1, help="k-means iterations."),
    labels: int = typer.Option(
        1,
        "--labels",
        min=1,
        help="Also list each sample's this many nearest clusters (MLCD's training labels).",
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass (embedding)."),
    device: str = DEVICE,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> None:
    """Spherical k-means over SOURCE's image embeddings; one cluster and distance per sample."""
    from lipkit.curate.cluster import run_cluster

    s = run_cluster(
        checkpoint,
        source,
        out,
        k,
        embeddings=embeddings,
        seed=seed,
        niter=niter,
        labels_per_sample=labels,
        batch_size=batch_size,
        device=device,
        image_column=image_column,
        caption_column=caption_column,
    )
    sizes = sorted(s["sizes"])
    table = Table(title=f"{s['k']} clusters of {s['n_assigned']} images", title_justify="left")
    for name in ("smallest", "median", "largest", "empty", "mean cosine to centroid"):
        table.add_column(name, justify="right")
    table.add_row(
        str(sizes[0]),
        str(sizes[len(sizes) // 2]),
        str(sizes[-1]),
        str(sizes.count(0)),
        f"{s['mean_cosine']:.3f}",
    )
    Console().print(table)
    if s["n_unassigned"]:
        console.print(f"[yellow]{s['n_unassigned']} image(s) could not be decoded and have no cluster[/]")
    console.print(f"[bold green]clusters[/] → {Path(out) / 'clusters.jsonl'}")


def reduce(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    clusters: Path = typer.Argument(..., help="Folder `lipkit data cluster` wrote for SOURCE."),
    out: Path = typer.Argument(..., help="Output folder: reduced.jsonl (or shards/) and reduce.json."),
    ratio: float = typer.Option(..., "--ratio", "-r", help="Share of the samples to keep, in (0, 1]."),
    pick: str = typer.Option(
        "nearest", "--pick", help="nearest: the samples nearest their centroid; random: uniform per cluster."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for --pick random."),
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> None:
    """Keep about RATIO of SOURCE, from every cluster in proportion to its size (TL;DR's selection)."""
    from lipkit.curate.reduce import run_reduce

    s = run_reduce(
        source,
        clusters,
        out,
        ratio,
        pick=pick,
        seed=seed,
        image_column=image_column,
        caption_column=caption_column,
    )
    if s["not_clustered"]:
        console.print(
            f"[yellow]{s['not_clustered']} row(s) have no cluster (images not embedded); left out[/]"
        )
    if s["unreadable"]:
        console.print(f"[yellow]{s['unreadable']} kept row(s) had unreadable image bytes; left out[/]")
    kept = [n for n in s["kept_per_cluster"] if n]
    console.print(
        f"[bold green]kept[/] {s['kept']} of {s['rows']} rows ({s['kept'] / max(1, s['rows']):.1%}) from "
        f"{len(kept)} clusters → {Path(out) / (s['written'] or '')}"
    )


def associate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(
        ..., help="Output folder: associated.jsonl (or shards/), associate.json, embeddings/."
    ),
    k: int = typer.Option(..., "-k", "--k", min=1, help="Texts to retrieve per image."),
    pool: str = typer.Option(
        ...,
        "--pool",
        help="The text pool: a .txt file (one text per line), a table's caption column (images not needed), "
        "or the captions of any source.",
    ),
    pool_captions: str = typer.Option(
        "all", "--pool-captions", help="all: every caption of each pool row; first: only its first."
    ),
    exclude_own: bool = typer.Option(
        False, "--exclude-own", help="Never retrieve a text equal to one of the row's own captions."
    ),
    balanced: Path = typer.Option(
        None,
        "--balanced",
        help="Clusters folder of SOURCE (`lipkit data cluster`): keep at most --per-cluster images per cluster, "
        "drawn uniformly.",
    ),
    per_cluster: int = typer.Option(
        None, "--per-cluster", min=1, help="With --balanced: images per cluster (default: the median size)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the balanced sample."),
    embeddings: Path = typer.Option(
        None,
        "--embeddings",
        help="SOURCE's image embeddings: a `lipkit embed` folder (reused), or where to write them "
        "(default OUT/embeddings).",
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images or texts per forward pass."),
    device: str = DEVICE,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> None:
    """Give each image of SOURCE the K nearest texts of a pool as `captions_retrieved` (RealSyn's retrieval)."""
    from lipkit.curate.associate import run_associate

    s = run_associate(
        checkpoint,
        source,
        out,
        k,
        pool,
        pool_captions=pool_captions,
        exclude_own=exclude_own,
        balanced=balanced,
        per_cluster=per_cluster,
        seed=seed,
        embeddings=embeddings,
        image_column=image_column,
        caption_column=caption_column,
        device=device,
        batch_size=batch_size,
    )
    if s["not_embedded"]:
        console.print(f"[yellow]{s['not_embedded']} image(s) could not be decoded; left out[/]")
    if s["per_cluster"] is not None:
        console.print(f"balanced: at most {s['per_cluster']} image(s) per cluster")
    if s["own_caption_retrieved"] is not None:
        console.print(f"an own caption among the {k} retrieved: {s['own_caption_retrieved']:.1%} of images")
    console.print(
        f"[bold green]associated[/] {s['written']} images with {k} of {s['pool_texts']} pool texts each "
        f"(mean top-1 similarity {s['mean_top1_similarity'] or 0:.3f}) → {Path(out) / (s['table'] or '')}"
    )


def pseudo_caption(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    source: str = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(
        ..., help="Output folder: pseudo.jsonl (or shards/), pseudo.json, embeddings/."
    ),
    attribute: list[str] = typer.Option(
        ...,
        "--attribute",
        "-a",
        help="NAME=V1,V2,... (or NAME=@FILE, one value a line): an attribute and the values it can take; repeat.",
    ),
    template: str = typer.Option(
        ..., "--template", "-t", help="The caption, naming attributes as {NAME}, e.g. 'a {colour} {animal}'."
    ),
    prompt: list[str] = typer.Option(
        ["{}"],
        "--prompt",
        help="Zero-shot prompt with {} for the value (repeat to ensemble), e.g. 'a photo of {}'.",
    ),
    embeddings: Path = typer.Option(
        None,
        "--embeddings",
        help="SOURCE's image embeddings (a `lipkit embed` folder, reused), or where to write them.",
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images or texts per forward pass."),
    device: str = DEVICE,
    image_column: str = IMAGE_COLUMN,
    caption_column: str = CAPTION_COLUMN,
) -> None:
    """Caption every image of SOURCE from zero-shot attribute predictions (PLIP's pseudo-captions)."""
    from lipkit.curate.pseudo_caption import parse_attributes, run_pseudo_caption

    s = run_pseudo_caption(
        checkpoint,
        source,
        out,
        parse_attributes(attribute),
        template,
        prompts=prompt,
        embeddings=embeddings,
        image_column=image_column,
        caption_column=caption_column,
        device=device,
        batch_size=batch_size,
    )
    if s["not_embedded"]:
        console.print(f"[yellow]{s['not_embedded']} image(s) could not be decoded; left out[/]")
    for name, share in s["agreement_with_source_columns"].items():
        console.print(f"{name}: the prediction equals SOURCE's column for {share:.1%} of images")
    console.print(f"[bold green]pseudo-captioned[/] {s['written']} images → {Path(out) / (s['table'] or '')}")


def register(app: typer.Typer) -> None:
    """Add cluster, reduce, associate and pseudo-caption to the `lipkit data` app."""
    app.command("cluster")(cluster)
    app.command("reduce")(reduce)
    app.command("associate")(associate)
    app.command("pseudo-caption")(pseudo_caption)
