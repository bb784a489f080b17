"""Checkpoints are directories: `config.json`, `model.safetensors`, `tokenizer.json`, `manifest.json`,
and for resumable training `trainer_state.safetensors` (optimizer moments, RNG states) plus
`trainer_state.json` (step, counters, Python/NumPy RNG states).

A checkpoint is written into a temporary sibling directory, every file fsync'ed, a manifest with the
SHA-256 of every file written last, and the directory renamed into place: a crash leaves either no
checkpoint or a complete one, and `find_resume` skips any directory whose manifest does not verify.
No pickles are involved.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lipkit import __version__
from lipkit.atomic import swap_dir, temp_dir_beside
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer

TrainingState = tuple[dict[str, torch.Tensor], dict[str, Any]]  # tensors, JSON-able metadata
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (checkpoint manifests; which checkpoint an export is of)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_dir(
    tmp: Path, model: DualEncoder, tokenizer: TextTokenizer, info: dict, training: TrainingState | None
):
    config = {
        "lipkit_version": __version__,
        "model": model.spec.to_dict(),
        "max_logit_scale": model.max_logit_scale,
        "context_length": tokenizer.context_length,
        **info,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "lipkit": __version__})
    tokenizer.save(tmp / "tokenizer.json")
    if training is not None:
        tensors, meta = training
        save_file(
            {k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainer_state.safetensors")
        )
        (tmp / "trainer_state.json").write_text(json.dumps(meta), encoding="utf-8")
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {"lipkit_version": __version__, "files": {p.name: file_sha256(p) for p in files}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")  # last


def save_checkpoint(
    path: str | Path,
    model: DualEncoder,
    tokenizer: TextTokenizer,
    info: dict[str, Any] | None = None,
    training: TrainingState | None = None,
) -> Path:
    """Write a checkpoint atomically to `path` (replacing an older one there)."""
    dest = Path(path)
    try:
        tmp = temp_dir_beside(dest)
    except OSError as e:
        raise UserError(
            f"Cannot create checkpoint directory '{dest.parent}' ({e.strerror}); "
            "make it writable or set train.output elsewhere."
        ) from e
    try:
        _write_dir(tmp, model, tokenizer, info or {}, training)
        swap_dir(tmp, dest)  # fsyncs every file (the manifest too) before the rename
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _DISK_ERRORS:
            raise UserError(
                f"Could not write checkpoint '{dest}' ({e.strerror}); free disk space or set "
                "train.output to a writable disk — earlier checkpoints are untouched."
            ) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def verify_checkpoint(path: Path) -> bool:
    """True when the manifest exists and every file it lists has the recorded SHA-256."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return all(file_sha256(path / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_resume(checkpoints: Path) -> Path | None:
    """The newest checkpoint under `checkpoints` that verifies; damaged ones are skipped with a warning."""
    if not checkpoints.is_dir():
        return None
    for path in sorted((p for p in checkpoints.iterdir() if p.name.startswith("step-")), reverse=True):
        if (path / "trainer_state.json").is_file() and verify_checkpoint(path):
            return path
        warnings.warn(f"skipping damaged checkpoint {path}", stacklevel=2)
    return None


def load_training_state(path: Path) -> TrainingState:
    if not verify_checkpoint(path) or not (path / "trainer_state.json").is_file():
        raise UserError(
            f"Checkpoint '{path}' is damaged or has no training state; resume from another one "
            "(train.resume=auto picks the newest valid checkpoint)."
        )
    tensors = load_file(str(path / "trainer_state.safetensors"))
    return tensors, json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def load_checkpoint(path: str | Path) -> tuple[DualEncoder, TextTokenizer, dict[str, Any]]:
    """Load a checkpoint directory written by `save_checkpoint`; the model is returned in eval mode."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(
            f"'{p}' is not a lipkit checkpoint (it needs config.json and model.safetensors); "
            "pass a directory written by `lipkit train`, e.g. runs/demo/checkpoint."
        )
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    spec = ModelSpec.from_dict(config["model"])
    model = DualEncoder(spec, max_logit_scale=config.get("max_logit_scale", 100.0))
    model.load_state_dict(load_file(str(p / "model.safetensors")))
    model.eval()
    tokenizer = TextTokenizer.load(p / "tokenizer.json", config.get("context_length", spec.context_length))
    return model, tokenizer, config


def prune(checkpoints: Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep_last` step-* checkpoints (and any in `keep`), and the temporary
    directories of writes that a crash interrupted."""
    for tmp in checkpoints.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    steps = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-"))
    for path in steps[: max(0, len(steps) - keep_last)]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
