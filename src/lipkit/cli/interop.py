"""`lipkit checkpoint convert`, `lipkit export onnx` and `lipkit quantize`: checkpoints in and out of OpenCLIP,
Hugging Face, ONNX (and int8 ONNX towers chosen by a quality check).

`lipkit.cli` calls `register(app)`; each command parses its arguments and calls one function of
`lipkit.interop`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lipkit.errors import UserError

console = Console(stderr=True)
FORMATS = {
    "open_clip": "open_clip",
    "open-clip": "open_clip",
    "openclip": "open_clip",
    "hf": "hf",
    "huggingface": "hf",
}
USAGE = (
    "lipkit checkpoint convert --from open_clip ARCH CHECKPOINT OUT | --from hf DIR OUT | "
    "--to open_clip CKPT OUT | --to hf CKPT OUT"
)


def _format(name: str, flag: str) -> str:
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise UserError(f"Unknown format '{name}' for {flag}; use open_clip or hf.")
    return fmt


def convert(
    args: list[str] = typer.Argument(
        ...,
        help="--from open_clip: ARCH CHECKPOINT OUT (ARCH is an OpenCLIP model name such as ViT-B-32, or a "
        "model-config JSON; CHECKPOINT a .safetensors/.pt state dict). --from hf: DIR OUT (a CLIPModel "
        "directory, or a VisionTextDualEncoderModel one lipkit wrote). --to open_clip / --to hf: CKPT OUT "
        "(a lipkit checkpoint directory).",
        show_default=False,
    ),
    from_: str = typer.Option(
        None, "--from", help="Read this format into a lipkit checkpoint: open_clip or hf."
    ),
    to: str = typer.Option(None, "--to", help="Write a lipkit checkpoint in this format: open_clip or hf."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT when --to writes over an existing one."
    ),
) -> None:
    """Convert checkpoints between lipkit and OpenCLIP or Hugging Face (CLIPModel; VisionTextDualEncoderModel
    for timm image + Hugging Face text towers)."""
    if (from_ is None) == (to is None):
        raise UserError(f"Give exactly one of --from or --to: {USAGE}.")
    if from_ is not None:
        fmt = _format(from_, "--from")
        want = 3 if fmt == "open_clip" else 2
        if len(args) != want:
            raise UserError(f"--from {fmt} takes {want} arguments, got {len(args)}: {USAGE}.")
        if fmt == "open_clip":
            from lipkit.interop.open_clip import import_open_clip

            out = import_open_clip(args[0], Path(args[1]), Path(args[2]))
        else:
            from lipkit.interop.hf import import_hf

            out = import_hf(Path(args[0]), Path(args[1]))
        console.print(f"lipkit checkpoint: {out}")
        return
    fmt = _format(to, "--to")
    if len(args) != 2:
        raise UserError(f"--to {fmt} takes 2 arguments (CKPT OUT), got {len(args)}: {USAGE}.")
    if fmt == "open_clip":
        from lipkit.interop.open_clip import export_open_clip

        out = export_open_clip(Path(args[0]), Path(args[1]), overwrite=overwrite)
        console.print(f"OpenCLIP model: {out}  (open_clip.create_model('local-dir:{out}'))")
    else:
        from lipkit.interop.hf import export_hf, loading_hint

        out = export_hf(Path(args[0]), Path(args[1]), overwrite=overwrite)
        console.print(f"Hugging Face model: {out}  ({loading_hint(out)})")


def export_onnx(
    checkpoint: Path = typer.Argument(..., help="lipkit checkpoint directory."),
    out: Path = typer.Argument(..., help="Output directory for image.onnx, text.onnx, tokenizer.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with PyTorch once."),
) -> None:
    """Export the image and text towers as two ONNX graphs (dynamic batch, normalised embeddings)."""
    from lipkit.interop.onnx import export_onnx as run

    path, diffs = run(checkpoint, out, overwrite=overwrite, check=check)
    console.print(f"ONNX: {path / 'image.onnx'}, {path / 'text.onnx'}")
    if diffs is not None:
        console.print(f"max |onnxruntime - torch|: image {diffs['image']:.2e}, text {diffs['text']:.2e}")


def quantize(
    checkpoint: Path = typer.Argument(..., help="lipkit checkpoint directory."),
    out: Path = typer.Argument(
        ..., help="Output folder: image.onnx, text.onnx (int8 or fp32), tokenizer.json, quant.json."
    ),
    eval_source: str = typer.Option(
        None,
        "--eval-source",
        help="Captions table the quality check evaluates on (default: the first data.eval split of the "
        "checkpoint's run config).",
    ),
    calibration_source: str = typer.Option(
        None,
        "--calibration-source",
        help="Table or image folder the static method calibrates on (default: the run config's data.train).",
    ),
    tolerance: float = typer.Option(
        1.0, help="Points of zero-shot top-1 or text→image R@1 a tower may lose and stay int8."
    ),
    threads: int = typer.Option(0, min=0, help="onnxruntime threads for the check (0: one per core)."),
    calibration_images: int = typer.Option(
        256, min=1, help="Calibration inputs per statically quantised tower."
    ),
    image_method: str = typer.Option("auto", help="auto, static (calibrated QDQ) or dynamic."),
    text_method: str = typer.Option("auto", help="auto, static (calibrated QDQ) or dynamic."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """int8 towers for `lipkit embed --int8` and `serve --int8`, each kept only if a measured quality check
    (zero-shot top-1, text→image R@1) loses at most --tolerance points; otherwise that tower stays fp32."""
    import time

    from lipkit.interop.quantize import QuantOptions, quantize_checkpoint

    opts = QuantOptions(
        eval_source=eval_source,
        calibration_source=calibration_source,
        tolerance=tolerance,
        threads=threads,
        calibration_images=calibration_images,
        image_method=image_method,
        text_method=text_method,
        overwrite=overwrite,
    )
    start = time.perf_counter()
    info = quantize_checkpoint(
        checkpoint,
        out,
        opts,
        log=lambda s: console.print(f"[dim]{time.perf_counter() - start:6.0f} s[/]  {s}"),
    )
    console.print(decision_table(info))
    console.print(chosen_line(info))
    console.print(f"ONNX towers: {out}  (lipkit embed CHECKPOINT SOURCE EMB --int8 {out})")


def _metric_name(key: str) -> str:
    if key.startswith("zeroshot/"):
        return key.split("/")[1] + " top-1"
    return key.replace("retrieval/text_to_image/", "t→i ")


def decision_table(info: dict) -> Table:
    """Per tower: the choice, each gated metric fp32 → int8 (points), and the measured speed-up."""
    table = Table(
        title=f"int8 check on {info['eval_images']} images, tolerance {info['tolerance_points']} points"
    )
    for col in ("tower", "metric", "fp32", "int8", "Δ", "items/s", "keeps"):
        table.add_column(col, justify="left" if col in ("tower", "metric", "keeps") else "right")
    for name, t in info["towers"].items():
        speed = t["throughput"]
        for i, key in enumerate(info["gated"]):
            first = i == 0
            table.add_row(
                f"{name} ({t['method']})" if first else "",
                _metric_name(key),
                f"{100 * t['metrics']['fp32'][key]:.2f}",
                f"{100 * t['metrics']['int8'][key]:.2f}",
                f"{-t['points_lost'][key] or 0.0:+.2f}",
                f"{speed['fp32']:.0f} → {speed['int8']:.0f} ({speed['speedup']:.1f}×)" if first else "",
                ("[green]int8[/]" if t["kept_int8"] else "[yellow]fp32[/]") if first else "",
            )
    return table


def chosen_line(info: dict) -> str:
    towers = ", ".join(f"{n} {t['precision']}" for n, t in info["towers"].items())
    scores = ", ".join(f"{_metric_name(k)} {100 * info['chosen'][k]:.2f}" for k in info["gated"])
    return f"with {towers}: {scores}"


def register(app: typer.Typer) -> None:
    """`lipkit checkpoint convert` (`lipkit convert`, the old spelling, stays a hidden alias for one
    release) and `lipkit export onnx` on the main app."""
    checkpoint_app = typer.Typer(
        help="Convert checkpoints to and from OpenCLIP and Hugging Face.", no_args_is_help=True
    )
    checkpoint_app.command("convert")(convert)
    app.add_typer(checkpoint_app, name="checkpoint")
    app.command("convert", hidden=True, help="Old spelling of `lipkit checkpoint convert`.")(convert)
    export_app = typer.Typer(help="Export a checkpoint for other runtimes.", no_args_is_help=True)
    export_app.command("onnx")(export_onnx)
    app.add_typer(export_app, name="export")
    app.command("quantize")(quantize)
