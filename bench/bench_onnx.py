"""onnxruntime vs PyTorch inference throughput of the exported towers (not a test).

    python bench/bench_onnx.py                  # tiny preset, random weights, batch 64
    python bench/bench_onnx.py --checkpoint runs/demo/checkpoint --batch 32 --threads 2

Exports image.onnx / text.onnx with `lipkit.interop.onnx`, checks the outputs agree, then times
both runtimes on the same inputs with the same thread count (median of --iters runs after
--warmup) and prints images/s, texts/s and the ratio onnxruntime / PyTorch. `--json` adds one
machine-readable line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lipkit.interop.onnx import export_towers
from lipkit.interop.peer_weights import require
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec


def median_seconds(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", type=Path, help="lipkit checkpoint (default: tiny preset, random weights)"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    args = ap.parse_args(argv)
    ort = require("onnxruntime", "The ONNX benchmark")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from lipkit.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)[0]
        name = str(args.checkpoint)
    else:
        model, name = DualEncoder(get_spec("tiny")).eval(), "tiny (random weights)"
    spec = model.spec
    images = torch.randn(args.batch, 3, spec.image_size, spec.image_size)
    ids = torch.randint(3, spec.vocab_size, (args.batch, spec.context_length))
    ids[:, 0], ids[:, -1] = 1, spec.eot_id

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        export_towers(model, Path(tmp))
        export_s = time.perf_counter() - t
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess_i = ort.InferenceSession(str(Path(tmp) / "image.onnx"), opts, providers=["CPUExecutionProvider"])
        sess_t = ort.InferenceSession(str(Path(tmp) / "text.onnx"), opts, providers=["CPUExecutionProvider"])
    feed_i, feed_t = {"pixel_values": images.numpy()}, {"input_ids": ids.numpy()}

    with torch.inference_mode():
        ref_i = F.normalize(model.visual(images), dim=-1)
        ref_t = F.normalize(model.text(ids), dim=-1)
        diff_i = (torch.from_numpy(sess_i.run(None, feed_i)[0]) - ref_i).abs().max().item()
        diff_t = (torch.from_numpy(sess_t.run(None, feed_t)[0]) - ref_t).abs().max().item()

        rows = {}
        for tower, torch_fn, ort_fn in (
            ("image", lambda: model.encode_image(images), lambda: sess_i.run(None, feed_i)),
            ("text", lambda: model.encode_text(ids), lambda: sess_t.run(None, feed_t)),
        ):
            pt = args.batch / median_seconds(torch_fn, args.iters, args.warmup)
            rt = args.batch / median_seconds(ort_fn, args.iters, args.warmup)
            rows[tower] = {"torch_per_s": pt, "onnxruntime_per_s": rt, "ratio": rt / pt}

    print(
        f"model: {name}  batch {args.batch}  threads {args.threads}  torch {torch.__version__}  "
        f"onnxruntime {ort.__version__}  export {export_s:.1f}s"
    )
    print(f"max |onnxruntime - torch|: image {diff_i:.1e}, text {diff_t:.1e}")
    print(f"{'':8}{'PyTorch':>14}{'onnxruntime':>14}{'ratio':>8}")
    for tower, r in rows.items():
        unit = "images/s" if tower == "image" else "texts/s"
        print(f"{unit:8}{r['torch_per_s']:>14.1f}{r['onnxruntime_per_s']:>14.1f}{r['ratio']:>7.2f}x")
    result = {
        "model": name,
        "batch": args.batch,
        "threads": args.threads,
        "max_diff": [diff_i, diff_t],
        **rows,
    }
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
