"""`lipkit data build | convert | export-eval | inspect | validate`: parse, call one library function, print.

SRC is anything `data.train` accepts: a CSV/TSV/JSONL table, a .parquet file or folder, a folder of images with .txt/.json captions, or WebDataset shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lipkit.errors import UserError

console = Console(stderr=True)
app = typer.Typer(help="Build and inspect datasets.", no_args_is_help=True)

SRC_HELP = (
    "A CSV/TSV/JSONL table, a .parquet file or folder, a folder of images with .txt/.json captions, or "
    "WebDataset shards (a .tar, a folder of them, or a brace pattern such as 'shards/{00000..00099}.tar')."
)


def _image_column() -> str:
    return typer.Option("image", "--image-column", help="Column naming the image (path or bytes).")


def _caption_column() -> str:
    return typer.Option("captions", "--caption-column", help="Column holding the caption(s).")


def _image_root() -> str:
    return typer.Option("", "--image-root", help="Folder image paths are relative to (default: the table's).")


def _skipped_table(title: str, report: dict) -> Table:
    from lipkit.data.records import REASONS

    table = Table(title=title)
    table.add_column("reason")
    table.add_column("samples", justify="right")
    table.add_column("what it means")
    table.add_column("examples (key: detail)")
    for reason, n in sorted(report["skipped"].items(), key=lambda x: -x[1]):
        examples = "\n".join(f"{k}: {d}" if d else k for k, d in report["examples"].get(reason, [])[:5])
        table.add_row(reason, str(n), REASONS.get(reason, ""), examples)
    return table


def _histogram(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("bin")
    table.add_column("count", justify="right")
    table.add_column("")
    top = max(counts.values(), default=1)
    for name, n in counts.items():
        table.add_row(name, str(n), "█" * max(1, round(30 * n / top)))
    return table


def _print_inspection(src: str, report: dict) -> None:
    out = Console()
    out.print(
        f"[bold]{src}[/] ({report['kind']}): {report['samples']} samples, {report['captions']} captions, "
        f"{sum(report['skipped'].values())} unusable"
    )
    out.print(_histogram("captions per sample", report["captions_per_sample"]))
    out.print(_histogram("caption length (words)", report["caption_words"]))
    out.print(_histogram("image shorter side (px)", report["image_shorter_side"]))
    out.print(_histogram("image formats", report["image_formats"]))
    if report["languages"]:
        out.print(_histogram("caption languages", report["languages"]))
    if report.get("clip_score"):
        cs = report["clip_score"]
        title = f"CLIP score ({cs['n']} pairs, median {cs['median']:.3f})"
        out.print(_histogram(title, cs["histogram"]))
    if report["skipped"]:
        out.print(_skipped_table("unusable samples", report))


@app.command("convert")
def convert(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Folder for the shards (created; must hold no shards yet)."),
    shard_size: int = typer.Option(1000, "--shard-size", "-n", help="Samples per shard."),
    verify: bool = typer.Option(
        False, "--verify", help="Decode every image and clip (slower) instead of reading headers only."
    ),
    image_column: str = _image_column(),
    caption_column: str = _caption_column(),
    image_root_: str = _image_root(),
) -> None:
    """Write WebDataset shards (img2dataset layout: NNNNNNNNN.jpg|png|webp + .txt + .json; a clip's video as
    NNNNNNNNN.mp4|webm|mkv|…, or its frames as NNNNNNNNN.0000.jpg, .0001.jpg, …) and lipkit-counts.json.
    Unusable samples are skipped and listed by reason."""
    from lipkit.data.convert import convert as run

    report = run(src, out, shard_size, image_column, caption_column, image_root_, verify).to_dict()
    if report["skipped"]:
        Console().print(_skipped_table("skipped", report))
    if not report["samples"]:
        raise UserError(
            f"None of the {sum(report['skipped'].values())} samples of '{src}' could be used (listed above); "
            "fix or remove them and convert again."
        )
    console.print(
        f"wrote {report['samples']} samples into {report['shards']} shards ({report['samples_per_s']:,.0f} "
        f"samples/s, {sum(report['skipped'].values())} skipped); train on them with "
        f"--set data.train='{report['pattern']}'"
    )


@app.command("export-eval")
def export_eval(
    src: str = typer.Argument(..., help=SRC_HELP),
    out: Path = typer.Argument(..., help="Folder for the evaluation set (created; must not exist)."),
    layout: str = typer.Option(
        "clip-benchmark",
        "--layout",
        help="clip-benchmark (CLIP_benchmark's WebDataset eval shards) or class-folders (OUT/<class>/*.png).",
    ),
    classes: str = typer.Option(
        "",
        "--classes",
        help="Metadata column naming each sample's class: a classification set (else retrieval).",
    ),
    template: list[str] = typer.Option(
        [],
        "--template",
        "-t",
        help="Prompt template ({} or {c} = the class name); repeatable (default: eval.templates).",
    ),
    first_caption: bool = typer.Option(
        False, "--first-caption", help="Retrieval: write each sample's first caption only."
    ),
    unique_captions: bool = typer.Option(
        False, "--unique-captions", help="Retrieval: keep only samples whose captions no other sample has."
    ),
    shard_size: int = typer.Option(1000, "--shard-size", "-n", help="Samples per shard (clip-benchmark)."),
    image_column: str = _image_column(),
    caption_column: str = _caption_column(),
    image_root_: str = _image_root(),
) -> None:
    """Write SRC as an evaluation set that CLIP_benchmark, torchvision's ImageFolder and `lipkit eval` all
    read: `lipkit eval CKPT --data OUT` evaluates it (zero-shot over its classes, or retrieval)."""
    from functools import partial

    from lipkit.config import EvalConfig
    from lipkit.data.eval_export import export_eval_set
    from lipkit.data.sources.registry import read_records

    report = export_eval_set(
        src,
        out,
        layout,
        classes,
        list(template) or EvalConfig().templates,
        all_captions=not first_caption,
        unique_captions=unique_captions,
        shard_size=shard_size,
        read=partial(
            read_records, image_column=image_column, caption_column=caption_column, image_root=image_root_
        ),
    ).to_dict()
    dropped = ", ".join(f"{n} {why}" for why, n in report["dropped"].items() if n) or "none"
    what = f"{report['classes']} classes" if classes else "retrieval captions"
    console.print(
        f"wrote {report['samples']} samples ({what}; left out: {dropped}) to {out}; evaluate with "
        f"lipkit eval CHECKPOINT --data {out.name}={out}"
    )


@app.command("inspect")
def inspect(
    src: str = typer.Argument(..., help=SRC_HELP),
    limit: int = typer.Option(0, "--limit", help="Look at the first N samples only (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON on stdout."),
    image_column: str = _image_column(),
    caption_column: str = _caption_column(),
    image_root_: str = _image_root(),
) -> None:
    """Counts, caption length and image size histograms, image formats, and caption languages (when a
    `langs` column exists). Reads image headers only."""
    from lipkit.data.inspection import inspect as run

    report = run(src, image_column, caption_column, image_root_, limit=limit, progress=not as_json).to_dict()
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_inspection(src, report)


@app.command("validate")
def validate(
    src: str = typer.Argument(..., help=SRC_HELP),
    size: int = typer.Option(64, "--size", help="Decode size (the check does not depend on it)."),
    workers: int = typer.Option(0, "--workers", "-w", help="Decode in this many processes."),
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON on stdout."),
    image_column: str = _image_column(),
    caption_column: str = _caption_column(),
    image_root_: str = _image_root(),
) -> None:
    """Read every sample and decode every image as training does; list what is broken by reason.
    Exit status 1 when anything is broken."""
    from lipkit.data.inspection import validate as run

    report = run(
        src, image_column, caption_column, image_root_, size, workers, progress=not as_json
    ).to_dict()
    broken = sum(report["skipped"].values())
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    elif broken:
        Console().print(_skipped_table(f"{broken} broken samples", report))
    console.print(
        f"{report['samples']} samples OK, {broken} broken"
        + (f" ({', '.join(f'{n} {r}' for r, n in report['skipped'].items())})" if broken else "")
    )
    if broken:
        raise typer.Exit(1)
