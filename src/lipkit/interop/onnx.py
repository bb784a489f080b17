"""ONNX export of the two towers: `image.onnx` and `text.onnx`, each returning L2-normalised embeddings.

- image.onnx: `pixel_values` float32 [batch, 3, S, S] (already resized and normalised with the
  checkpoint's image_mean/std) → `image_embeds` float32 [batch, D]
- text.onnx: `input_ids` int64 [batch, length] (ids from the checkpoint's tokenizer.json, padded to
  the tokenizer's context length or cut after the end token; length ≤ the model's context_length)
  → `text_embeds` float32 [batch, D]

Batch and text length are dynamic. Beside the graphs go `tokenizer.json` and `onnx_config.json`
(image size, mean/std, context length, logit scale), which is all a runtime needs. Export uses
`torch.onnx.export` (the dynamo exporter, which needs `onnxscript`); when onnxruntime is installed
the graphs are run once against PyTorch and the largest difference is reported.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import rich
import torch
import torch.nn.functional as F
from torch import nn

from lipkit.atomic import write_dir
from lipkit.errors import UserError
from lipkit.interop import refuse_existing
from lipkit.interop.peer_weights import require
from lipkit.models.dual_encoder import DualEncoder
from lipkit.text.tokenizer import TextTokenizer

OPSET = 18


class ImageTower(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.visual = model.visual
        self.adapter = model.image_adapter  # CLIP-Adapter's residual MLP (lipkit adapt), or None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.visual(pixel_values)
        return F.normalize(feats if self.adapter is None else self.adapter(feats), dim=-1)


class TextTower(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids), dim=-1)


def _export(
    module: nn.Module, example: torch.Tensor, name: str, output: str, path: Path, max_len: int | None = None
) -> None:
    require("onnxscript", "ONNX export")
    require("onnx", "ONNX export")
    dims = {0: torch.export.Dim("batch", min=1, max=65536)}
    if max_len is not None:
        dims[1] = torch.export.Dim("length", min=2, max=max_len)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[name],
            output_names=[output],
            dynamic_shapes={name: dims},
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))  # a tower over 2 GB (protobuf's limit) gets its weights in a side file


def export_towers(model: DualEncoder, out_dir: Path) -> tuple[Path, Path]:
    """Write image.onnx and text.onnx for `model` into `out_dir`."""
    model = model.eval().float()
    spec = model.spec
    image = out_dir / "image.onnx"
    text = out_dir / "text.onnx"
    _export(
        ImageTower(model),
        torch.zeros(2, 3, spec.image_size, spec.image_size),
        "pixel_values",
        "image_embeds",
        image,
    )
    ids = torch.zeros(2, spec.context_length, dtype=torch.long)
    ids[:, 0], ids[:, 1] = 1, spec.eot_id
    _export(TextTower(model), ids, "input_ids", "text_embeds", text, max_len=spec.context_length)
    return image, text


def verify(model: DualEncoder, out_dir: Path, batch: int = 3, seed: int = 0) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch on random inputs (needs onnxruntime)."""
    ort = require("onnxruntime", "Checking the ONNX export")
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)
    ids = torch.randint(0, spec.vocab_size, (batch, spec.context_length), generator=g)
    ids[:, -1] = spec.eot_id
    with torch.no_grad():
        ref_i = model.encode_image(images).numpy()
        ref_t = F.normalize(model.text(ids), dim=-1).numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    run_i = ort.InferenceSession(str(out_dir / "image.onnx"), opts, providers=["CPUExecutionProvider"])
    run_t = ort.InferenceSession(str(out_dir / "text.onnx"), opts, providers=["CPUExecutionProvider"])
    got_i = run_i.run(None, {"pixel_values": images.numpy()})[0]
    got_t = run_t.run(None, {"input_ids": ids.numpy()})[0]
    return {"image": float(abs(got_i - ref_i).max()), "text": float(abs(got_t - ref_t).max())}


def export_onnx(
    checkpoint: str | Path, out: str | Path, overwrite: bool = False, check: bool = True
) -> tuple[Path, dict[str, float] | None]:
    """`lipkit export onnx CHECKPOINT OUT`: both towers, tokenizer and preprocessing config into OUT.

    Returns the directory and, when `check` and onnxruntime is installed, the max abs differences
    to PyTorch."""
    from lipkit.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    return write_onnx(model, tok, out, overwrite, check)


def write_onnx(
    model: DualEncoder, tokenizer: TextTokenizer, out: str | Path, overwrite: bool = False, check: bool = True
) -> tuple[Path, dict[str, float] | None]:
    out = Path(out).expanduser()
    refuse_existing(out, overwrite)
    diffs: dict[str, float] | None = None
    head = (model.spec.adapter or {}).get("method")
    if head in ("coop", "tip"):
        rich.get_console().print(
            f"[yellow]export:[/] the ONNX towers do not carry this checkpoint's {head} class head from "
            "`lipkit adapt` (its zero-shot of the adapted column); they are the towers it was adapted from",
            highlight=False,
        )
    if head in ("pic2word", "rtd"):
        rich.get_console().print(
            f"[yellow]export:[/] the ONNX towers do not carry this checkpoint's {head} mapping network from "
            "`lipkit adapt`: `lipkit search --int8` answers an image plus words by the sum of their embeddings",
            highlight=False,
        )

    def write(tmp: Path) -> None:
        nonlocal diffs
        export_towers(model, tmp)
        spec = model.spec
        cfg: dict[str, Any] = {
            "image_input": "pixel_values",
            "text_input": "input_ids",
            "image_size": spec.image_size,
            "image_mean": list(spec.image_mean),
            "image_std": list(spec.image_std),
            "context_length": tokenizer.context_length,  # what tokenizer.json pads to
            "max_text_length": spec.context_length,  # the longest input_ids text.onnx accepts
            "pad_id": tokenizer.pad_id,
            "embed_dim": spec.embed_dim,
            "logit_scale": model.scale().item(),
            "opset": OPSET,
        }
        (tmp / "onnx_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        tokenizer.save(tmp / "tokenizer.json")
        if check:
            try:
                diffs = verify(model, tmp)
            except UserError:
                diffs = None  # onnxruntime is optional

    return write_dir(out, write), diffs
