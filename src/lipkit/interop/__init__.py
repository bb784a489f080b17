"""Checkpoints in and out: OpenCLIP state dicts, Hugging Face `CLIPModel` directories, ONNX graphs.

`open_clip.py` and `hf.py` map lipkit's `ModelSpec` and state dict to the peer's config and names
(lipkit's parameter names follow OpenCLIP, so that side is nearly a rename); `clip_bpe.py` builds
CLIP's BPE tokenizer with `tokenizers`; `onnx.py` exports the two towers; `peer_weights.py` reads the
peers' weight files. The peer libraries are optional (`pip install 'lipkit[interop]'`): reading and
writing either format needs only safetensors.

Every export is a directory written whole by `lipkit.atomic.write_dir`, after `refuse_existing`.
"""

from __future__ import annotations

from pathlib import Path

from lipkit.errors import UserError


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse to export into a non-empty `out` (a file, or a directory with anything in it) unless
    `overwrite`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"Output '{out}' already exists; choose a new path or pass --overwrite.")


def check_not_adapted(spec, target: str) -> None:
    """Refuse what `lipkit adapt` put beside the towers: a conversion would drop it."""
    if not spec.adapter:
        return
    method = spec.adapter.get("method")
    onnx = {
        "clip-adapter": " or this one with `lipkit export onnx` (its image graph carries the MLP)",
        "rtd": " (whose text tower RTD has since tuned), or this one's towers with `lipkit export onnx`",
    }.get(method, "")
    same = "" if method == "rtd" else " (the same towers)"
    raise UserError(
        f"This checkpoint holds a {method} adapter from `lipkit adapt`, which {target} cannot hold and a "
        f"conversion would drop; export the checkpoint it was adapted from{same}{onnx}."
    )
