"""`lipkit checkpoint convert` and `lipkit export onnx`: checkpoints in and out of OpenCLIP, Hugging Face, ONNX.

`lipkit.cli` calls `register(app)`; each command parses its arguments and calls one function of
`lipkit.interop`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

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
