"""`lipkit quantize CHECKPOINT OUT`: int8 towers through onnxruntime's quantiser, each kept only when a
measured quality check says it loses no more than `tolerance` points.

1. Export both towers to ONNX (`interop.onnx.write_onnx`, fp32).
2. Quantise each tower (`interop.quant_graph`, int8 weights with one scale per output channel):
   - "static": QDQ with uint8 activations whose ranges are calibrated (min–max) on inputs drawn from a
     calibration source. What convolutional towers need: onnxruntime's dynamic path turns a Conv into
     ConvInteger, measured 10× *slower* than fp32 on the demo's EfficientNet-Lite0 tower, while static
     QDQ runs it 2–2.5× faster than fp32.
   - "dynamic": MatMul/Gemm weights int8, activation ranges taken per batch at run time; no calibration
     data. What transformer towers need (the demo's MiniLM text tower: ~2× faster than fp32, no loss;
     static QDQ of the same tower lost 31 points of zero-shot top-1, which the check refused).
   "auto" picks static when convolutions hold most of a graph's weights, dynamic otherwise (a ViT's
   patch convolution holds ~1 % of its weights; for the tiny ViT, static was slower than dynamic and
   less accurate). Per-channel scales matter: per-tensor ones lost 9 points of zero-shot top-1 on the
   demo's image tower and 2 points of text→image R@1 on its text tower; per-channel under 0.5.
3. The quality check: on an evaluation table, zero-shot classification and image↔text retrieval (the
   code of `lipkit eval`, dense similarity) with both towers fp32, then with each int8 tower swapped
   in. A tower stays int8 only when every gated metric — zero-shot top-1 of each class column and
   text→image R@1 — drops by at most `tolerance` points (a gain is no loss); otherwise its fp32 graph
   is kept. Then the pair as chosen is evaluated together; if two int8 towers together lose more than
   the tolerance, the one that lost more alone goes back to fp32.
4. OUT: image.onnx and text.onnx (each int8 or fp32 as decided), tokenizer.json, onnx_config.json, and
   quant.json with the decision, the metrics of both precisions and their throughput (items/s, fp32 and
   int8 interleaved on the same batch), which `search.onnx_encoder.OnnxEncoder` (`lipkit embed --int8`)
   reads.

Dynamic quantisation takes activation ranges per call, so a text's int8 embedding moves with the batch
it is encoded in about as much as int8 moves it from fp32 (demo captions: cosine to fp32 0.990 mean,
0.977 lowest, alone or in batches of 16 or 256 alike); a static tower gives the same vector in any batch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lipkit import __version__
from lipkit.atomic import write_dir
from lipkit.checkpoint import file_sha256
from lipkit.config import Config, config_from_dict
from lipkit.data.image_store import ImageStore
from lipkit.errors import UserError
from lipkit.eval.suite import spread_subset
from lipkit.interop import refuse_existing
from lipkit.interop.peer_weights import require
from lipkit.interop.quant_check import EvalSet, Memo, drops, gated, image_run, rates, session, text_run
from lipkit.interop.quant_graph import (
    METHODS,
    Calibration,
    missing_calibration,
    pick_method,
    quantize_graph,
    read_source,
)

TOWERS = ("image", "text")
SPEED_BATCH = 64


@dataclass
class QuantOptions:
    eval_source: str | Path | None = None  # default: the run config's first data.eval split
    calibration_source: str | Path | None = None  # default: the run config's data.train
    tolerance: float = 1.0  # points a gated metric may drop
    threads: int = 0  # onnxruntime intra-op threads (0: its default)
    calibration_images: int = 256
    image_method: str = "auto"
    text_method: str = "auto"
    overwrite: bool = False
    seed: int = 0


def run_config(checkpoint: Path) -> Config | None:
    """The training config of the run a checkpoint belongs to (runs/X/config.json beside runs/X/checkpoint,
    or two levels up from runs/X/checkpoints/step-N), when there is one."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "data" in data and "model" in data:
                try:
                    return config_from_dict(data)
                except UserError:
                    return None
    return None


def _eval_source(opts: QuantOptions, cfg: Config) -> str | Path:
    if opts.eval_source:
        return opts.eval_source
    if cfg.data.eval:
        return next(iter(cfg.data.eval.values()))
    raise UserError(
        "There is nothing to check the int8 towers against: the checkpoint's run config names no "
        "evaluation split; pass --eval-source TABLE (a captions table, e.g. test-style.jsonl)."
    )


@dataclass
class _Tower:
    name: str
    method: str
    fp32: Path
    int8: Path
    quant: dict[str, Any]


def _quantize_towers(
    fp32: Path, opts: QuantOptions, calibration: Calibration, log: Callable[[str], None]
) -> dict[str, _Tower]:
    towers = {}
    for name, method, feeds in (
        ("image", opts.image_method, calibration.images),
        ("text", opts.text_method, calibration.texts),
    ):
        src = fp32 / f"{name}.onnx"
        chosen = pick_method(method, src)
        log(f"quantising the {name} tower ({chosen})")
        dst = fp32.parent / f"{name}.int8.onnx"
        towers[name] = _Tower(name, chosen, src, dst, quantize_graph(src, dst, chosen, feeds))
    return towers


def _measure(
    towers: dict[str, _Tower],
    evalset: EvalSet,
    onnx_cfg: dict[str, Any],
    opts: QuantOptions,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Metrics fp32, with each int8 tower swapped in and with the chosen pair; throughput per tower."""
    make = {"image": image_run, "text": text_run}
    runs = {
        (t, p): make[t](session(_ort(), getattr(towers[t], p), opts.threads), onnx_cfg)
        for t in TOWERS
        for p in ("fp32", "int8")
    }
    memo = {k: Memo(v) for k, v in runs.items()}
    log(f"evaluating fp32 on {len(evalset.records)} images")
    full = evalset.metrics(memo["image", "fp32"], memo["text", "fp32"])
    keys = gated(full)
    report: dict[str, Any] = {"fp32": full, "gated": keys, "towers": {}}
    images = evalset.store.cache[:SPEED_BATCH].numpy()
    ids = evalset.tokenizer([r.captions[0] for r in evalset.records[:SPEED_BATCH]]).numpy()
    inputs = {"image": images, "text": ids}
    for t in TOWERS:
        log(f"evaluating with the int8 {t} tower")
        other = "text" if t == "image" else "image"
        pair = {t: memo[t, "int8"], other: memo[other, "fp32"]}
        int8 = evalset.metrics(pair["image"], pair["text"])
        lost = drops(full, int8, keys)
        speed = rates({p: partial(runs[t, p], inputs[t]) for p in ("fp32", "int8")}, len(inputs[t]))
        ok = all(v <= opts.tolerance for v in lost.values())
        report["towers"][t] = {
            "precision": "int8" if ok else "fp32",
            **towers[t].quant,
            "metrics": {"fp32": {k: full[k] for k in keys}, "int8": {k: int8[k] for k in keys}},
            "points_lost": lost,
            "kept_int8": ok,
            "throughput": {
                "unit": f"{t}s/s",
                "batch": len(inputs[t]),
                **speed,
                "speedup": round(speed["int8"] / speed["fp32"], 2),
            },
            "bytes": {p: getattr(towers[t], p).stat().st_size for p in ("fp32", "int8")},
        }
    _check_pair(report, evalset, memo, opts.tolerance, log)
    return report


def _check_pair(
    report: dict[str, Any],
    evalset: EvalSet,
    memo: dict[tuple[str, str], Memo],
    tolerance: float,
    log: Callable[[str], None],
) -> None:
    """The towers as chosen, evaluated together: when both int8 towers together lose more than the
    tolerance, the one that lost more alone goes back to fp32."""
    towers, keys = report["towers"], report["gated"]
    while True:
        pick = {t: towers[t]["precision"] for t in TOWERS}
        chosen = evalset.metrics(memo["image", pick["image"]], memo["text", pick["text"]])
        lost = drops(report["fp32"], chosen, keys)
        int8 = [t for t in TOWERS if pick[t] == "int8"]
        if len(int8) < 2 or all(v <= tolerance for v in lost.values()):
            break
        worst = max(int8, key=lambda t: max(towers[t]["points_lost"].values()))
        log(f"both int8 towers together lose more than {tolerance} points: the {worst} tower stays fp32")
        towers[worst].update(precision="fp32", kept_int8=False, note="the pair lost too much together")
    report["chosen"], report["chosen_points_lost"] = chosen, lost


def _inputs(checkpoint: Path, opts: QuantOptions) -> tuple[Config, str | Path, list, str | Path | None]:
    """The run config (or defaults), the evaluation source and its records, the calibration source:
    checked before anything slow starts."""
    cfg = run_config(checkpoint) or Config()
    eval_source = _eval_source(opts, cfg)
    records = read_source(eval_source, cfg, "evaluation source")
    records = spread_subset(records, cfg.eval.max_images)
    if not all(r.captions for r in records):
        raise UserError(
            f"The evaluation source '{eval_source}' has rows without captions; pass a captions table."
        )
    calibration_source = opts.calibration_source or cfg.data.train or None
    for tower, method in (("image", opts.image_method), ("text", opts.text_method)):
        if method == "static" and calibration_source is None:
            raise missing_calibration(tower)
    return cfg, eval_source, records, calibration_source


def _ort() -> Any:
    return require("onnxruntime", "Quantisation")


def quantize_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    opts: QuantOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export, quantise, check and write OUT (see the module doc); returns quant.json's content."""
    opts = opts or QuantOptions()
    say = log or (lambda _: None)
    ort = _ort()
    require("onnx", "Quantisation")
    for flag, method in (("--image-method", opts.image_method), ("--text-method", opts.text_method)):
        if method not in METHODS:
            raise UserError(f"{flag} '{method}' is unknown; use one of {', '.join(METHODS)}.")
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    refuse_existing(out, opts.overwrite)
    from lipkit.checkpoint import load_checkpoint
    from lipkit.interop.onnx import write_onnx

    if not (checkpoint / "config.json").is_file() or not (checkpoint / "model.safetensors").is_file():
        load_checkpoint(checkpoint)  # its UserError names the fix
    cfg, eval_source, records, calibration_source = _inputs(checkpoint, opts)
    model, tok, _ = load_checkpoint(checkpoint)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lipkit-quantize-") as tmp:
        say("exporting the fp32 towers to ONNX")
        fp32 = write_onnx(model, tok, Path(tmp) / "fp32", check=False)[0]
        del model
        onnx_cfg = json.loads((fp32 / "onnx_config.json").read_text(encoding="utf-8"))
        calibration = Calibration(calibration_source, cfg, onnx_cfg, tok, opts.calibration_images, opts.seed)
        towers = _quantize_towers(fp32, opts, calibration, say)
        store = ImageStore(records, onnx_cfg["image_size"], cache=True, desc="evaluation")
        report = _measure(towers, EvalSet(records, store, tok, cfg.eval), onnx_cfg, opts, say)
        info = {
            "format": "lipkit-quant",
            "version": 1,
            "lipkit_version": __version__,
            "onnxruntime_version": ort.__version__,
            "checkpoint": {
                "path": str(checkpoint.resolve()),
                "model_sha256": file_sha256(checkpoint / "model.safetensors"),
            },
            "eval_source": str(eval_source),
            "eval_images": len(records),
            "calibration_source": str(calibration_source) if calibration_source else None,
            "tolerance_points": opts.tolerance,
            "threads": opts.threads,
            "seconds": round(time.perf_counter() - start, 1),
            **report,
        }
        write_dir(out, lambda d: _write_out(d, fp32, towers, info))
    return info


def _write_out(dest: Path, fp32: Path, towers: dict[str, _Tower], info: dict[str, Any]) -> None:
    for name in ("tokenizer.json", "onnx_config.json"):
        shutil.copy2(fp32 / name, dest / name)
    for t, tower in towers.items():
        int8 = info["towers"][t]["precision"] == "int8"
        src = tower.int8 if int8 else tower.fp32
        shutil.copy2(src, dest / f"{t}.onnx")
        side = src.with_name(src.name + ".data")  # a graph over 2 GB keeps its weights beside it
        if side.is_file():
            shutil.copy2(side, dest / side.name.replace(src.stem, t))
    (dest / "quant.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
