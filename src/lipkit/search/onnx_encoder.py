"""Image and text embeddings from an ONNX folder (`lipkit export onnx` or `lipkit quantize`), run with
onnxruntime alone: no PyTorch model, and int8 towers where `lipkit quantize` kept them.

The folder holds image.onnx, text.onnx, tokenizer.json, onnx_config.json and, from `lipkit quantize`,
quant.json (the precision chosen per tower and the measurements behind it). Images are prepared exactly
as `DualEncoder.embed_images_u8` prepares them (uint8 at the model's size, scaled to [0, 1], normalised
with the checkpoint's mean/std); texts are tokenised with the checkpoint's tokenizer and cut after the
longest row's last non-padding token (the graphs take any length up to the context length).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipkit.checkpoint import file_sha256
from lipkit.data.transforms import normalize
from lipkit.errors import UserError
from lipkit.text.tokenizer import TextTokenizer

FILES = ("image.onnx", "text.onnx", "tokenizer.json", "onnx_config.json")
INSTALL = "pip install 'lipkit[interop]'"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError(
            f"Running ONNX towers needs the 'onnxruntime' package, which is not installed; run {INSTALL}."
        ) from e
    return onnxruntime


def session_options(ort: Any, threads: int) -> Any:
    """One intra-op pool of `threads` (0: onnxruntime's default, one per physical core), no inter-op
    pool. Worker threads spin while idle only under OMP_WAIT_POLICY=ACTIVE: lipkit waits passively by
    default on machines other jobs share (see `lipkit.cli.main`)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    spin = os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


def trim_padding(ids: np.ndarray, pad_id: int, max_length: int) -> np.ndarray:
    """Drop the columns after the last non-padding token of any row (at least 2 columns, at most
    `max_length`): the towers pool over unpadded positions, so the result is the same, and short texts
    cost their own length."""
    used = np.flatnonzero((ids != pad_id).any(0))
    n = int(used[-1]) + 1 if used.size else 2
    return np.ascontiguousarray(ids[:, : max(2, min(n, max_length))])


class OnnxEncoder:
    """`OnnxEncoder(folder, threads=1)`: `images(u8)` and `texts(list)` → float32 (B, dim) L2-normalised.

    `threads` is onnxruntime's intra-op thread count per call (0: its default); calls may come from
    several threads at once. `precision` says what each tower runs at ("int8" or "fp32"); `info` is
    quant.json (empty for a plain `lipkit export onnx` folder)."""

    def __init__(self, folder: str | Path, threads: int = 1) -> None:
        self.folder = Path(folder).expanduser()
        missing = [f for f in FILES if not (self.folder / f).is_file()]
        if missing:
            raise UserError(
                f"'{self.folder}' is not an ONNX folder (it lacks {', '.join(missing)}); write one with "
                "`lipkit quantize CHECKPOINT DIR` or `lipkit export onnx CHECKPOINT DIR`."
            )
        ort = _onnxruntime()
        cfg = json.loads((self.folder / "onnx_config.json").read_text(encoding="utf-8"))
        self.config = cfg
        self.image_size: int = int(cfg["image_size"])
        self.dim: int = int(cfg["embed_dim"])
        self.mean, self.std = list(cfg["image_mean"]), list(cfg["image_std"])
        self.max_text_length = int(cfg.get("max_text_length", cfg["context_length"]))
        self.tokenizer = TextTokenizer.load(self.folder / "tokenizer.json", int(cfg["context_length"]))
        quant = self.folder / "quant.json"
        self.info: dict[str, Any] = json.loads(quant.read_text(encoding="utf-8")) if quant.is_file() else {}
        towers = self.info.get("towers", {})
        self.precision = {t: towers.get(t, {}).get("precision", "fp32") for t in ("image", "text")}
        opts = session_options(ort, threads)
        providers = ["CPUExecutionProvider"]
        self._image = ort.InferenceSession(str(self.folder / "image.onnx"), opts, providers=providers)
        self._text = ort.InferenceSession(str(self.folder / "text.onnx"), opts, providers=providers)
        self._image_input = cfg.get("image_input", "pixel_values")
        self._text_input = cfg.get("text_input", "input_ids")

    def images(self, u8: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, S, S) at `image_size` → float32 (B, dim) L2-normalised embeddings."""
        if u8.ndim != 4 or tuple(u8.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}), not {tuple(u8.shape)}"
            )
        if u8.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        x = normalize(u8, self.mean, self.std).numpy()
        return self._image.run(None, {self._image_input: x})[0].astype(np.float32, copy=False)

    def texts(self, texts: list[str]) -> np.ndarray:
        """Strings → float32 (B, dim) L2-normalised embeddings."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = trim_padding(self.tokenizer(list(texts)).numpy(), self.tokenizer.pad_id, self.max_text_length)
        return self._text.run(None, {self._text_input: ids})[0].astype(np.float32, copy=False)

    def fingerprint(self) -> str:
        """Hash of the two graphs: embeddings from other graphs are other vectors."""
        h = hashlib.sha256()
        for name in ("image.onnx", "text.onnx"):
            with (self.folder / name).open("rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        return h.hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        """What an embeddings manifest records about the encoder."""
        return {"folder": str(self.folder.resolve()), **self.precision}


def onnx_towers_of(checkpoint: str | Path, folder: str | Path, threads: int) -> OnnxEncoder:
    """The OnnxEncoder of `folder`, refused when it was quantised from another checkpoint or when the
    checkpoint has LexLIP heads (the ONNX graphs carry the dense towers only)."""
    ck = Path(checkpoint).expanduser()
    if not (ck / "config.json").is_file() or not (ck / "model.safetensors").is_file():
        raise UserError(
            f"'{ck}' is not a lipkit checkpoint (it needs config.json and model.safetensors); pass the "
            "checkpoint the --int8 folder was made from."
        )
    if json.loads((ck / "config.json").read_text(encoding="utf-8"))["model"].get("lexicon_vocab", 0):
        raise UserError(f"'{ck}' has LexLIP heads, which the ONNX towers leave out; embed it without --int8.")
    encoder = OnnxEncoder(folder, threads=threads)
    made_from = encoder.info.get("checkpoint", {}).get("model_sha256")
    if made_from is not None and made_from != file_sha256(ck / "model.safetensors"):
        raise UserError(
            f"'{encoder.folder}' was quantised from another checkpoint than '{ck}'; run "
            f"`lipkit quantize {ck} DIR` and pass that DIR to --int8."
        )
    return encoder
