"""Checkpoints are directories: `config.json`, `model.safetensors`, `tokenizer.json`.

They are written into a temporary sibling directory, fsync'ed, and renamed into place, so a crash
leaves either the old checkpoint or the new one, never half of one. No pickles are involved.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from lipkit import __version__
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec
from lipkit.text.tokenizer import TextTokenizer


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | Path, model: DualEncoder, tokenizer: TextTokenizer, info: dict[str, Any] | None = None
) -> Path:
    """Write model + tokenizer + config atomically to `path` (replacing an older checkpoint there)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        config = {
            "lipkit_version": __version__,
            "model": model.spec.to_dict(),
            "max_logit_scale": model.max_logit_scale,
            "context_length": tokenizer.context_length,
            **(info or {}),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "lipkit": __version__})
        tokenizer.save(tmp / "tokenizer.json")
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


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
