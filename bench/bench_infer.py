"""Image-tower inference: OpenCLIP vs lipkit (PyTorch, and onnxruntime fp32 / int8) on the same
architecture and weights (not a test).

    python bench/bench_infer.py                                        # tiny preset, batch 128, 2 threads
    python bench/bench_infer.py --checkpoint runs/demo/checkpoint      # the demo's EfficientNet-Lite0 tower
    python bench/bench_infer.py --batches 2 --rounds 5 --json runs/bench_infer.json

What it does, in one process:
1. Builds the image tower: the preset's (random weights, seeded) or a checkpoint's. The OpenCLIP model is
   made from lipkit's config mapping (`lipkit.interop.open_clip.open_clip_model_config` →
   `open_clip.create_model`, random init) and given lipkit's image-tower weights
   (`state_to_open_clip`); the script stops unless both have the same image-tower parameter count, and
   prints how far each variant's embeddings are from OpenCLIP fp32 (max |Δ|, min cosine).
2. Exports lipkit's image tower to ONNX (`lipkit.interop.onnx`) and quantises it to int8 the way
   `lipkit quantize` does (`lipkit.interop.quant_graph`: "auto" is static QDQ for a CNN, dynamic for a
   ViT). Calibration here uses random images (speed does not depend on them; `lipkit quantize` measures
   the quality on real data).
3. Variants, all on the same normalised float batch (random uint8 images at the tower's size):
   - OpenCLIP fp32 and bf16: `model.encode_image(x, normalize=True)` under `open_clip_train`'s autocast
     (`amp_bf16` on the CPU), `model.eval()`, `torch.no_grad()`;
   - lipkit fp32 and bf16: `DualEncoder.encode_image` after `search.encode.prepare_for_inference` (eval,
     channels-last for convolutional towers; for bf16 the linear/conv weights cast once) under
     `search.encode.inference_precision` — what `lipkit serve --precision` runs;
   - lipkit onnxruntime fp32 and int8: the two graphs, what `lipkit embed/serve --int8` runs.
4. Interleaved: each of `--rounds` rounds runs `--batches` batches of every variant (the order reversed
   every other round), after `--warmup` untimed batches each. Reports the median images/s over rounds
   with the spread (min–max), and ratios as the median of per-round ratios: every variant against
   OpenCLIP bf16, and the same-precision ratios (lipkit bf16 / OpenCLIP bf16, lipkit fp32 / OpenCLIP
   fp32, onnxruntime fp32 / OpenCLIP fp32).

Threads: `--threads` for torch (`torch.set_num_threads`) and onnxruntime (intra-op); OMP_WAIT_POLICY is
set to `--omp-wait-policy` (default passive, what `lipkit` sets) before torch loads, and onnxruntime's
threads spin only when it is ACTIVE. Run it when the machine is quiet: the load is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OC_NAME = "lipkit-bench-infer"
VARIANTS = (
    "open_clip fp32",
    "open_clip bf16",
    "lipkit fp32",
    "lipkit bf16",
    "lipkit onnx fp32",
    "lipkit onnx int8",
)
SAME_PRECISION = (
    ("lipkit bf16", "open_clip bf16"),
    ("lipkit fp32", "open_clip fp32"),
    ("lipkit onnx fp32", "open_clip fp32"),
)


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def build_models(args: argparse.Namespace):
    """(lipkit DualEncoder, OpenCLIP model with lipkit's image-tower weights, a description)."""
    import open_clip
    import torch

    from lipkit.interop.open_clip import open_clip_model_config, state_to_open_clip
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    torch.manual_seed(args.seed)
    if args.checkpoint:
        from lipkit.checkpoint import load_checkpoint

        ours, what = load_checkpoint(args.checkpoint)[0], f"checkpoint {args.checkpoint}"
    else:
        ours, what = DualEncoder(get_spec(args.preset)).eval(), f"preset {args.preset} (random weights)"
    spec = ours.spec
    # OpenCLIP's image tower from lipkit's mapping; a small lipkit text transformer stands in for the
    # text tower (this bench times images only, and a Hugging Face text tower needs its files)
    text_free = replace(
        spec, text_tower="transformer", text_width=64, text_layers=1, text_heads=2, lexicon_vocab=0
    )
    cfg = open_clip_model_config(text_free)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{OC_NAME}.json"
        path.write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(path)
    peer = open_clip.create_model(OC_NAME, pretrained=None, device="cpu").eval()
    visual = {k: v for k, v in state_to_open_clip(ours.state_dict()).items() if k.startswith("visual.")}
    missing, unexpected = peer.load_state_dict(visual, strict=False)
    missing = [k for k in missing if k.startswith("visual.")]
    n_ours = sum(p.numel() for p in ours.visual.parameters())
    n_peer = sum(p.numel() for p in peer.visual.parameters())
    if missing or unexpected or n_ours != n_peer:
        raise SystemExit(
            f"the image towers differ: {n_ours:,} vs {n_peer:,} parameters, missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return ours, peer, f"{what}; image tower {n_ours:,} parameters in both"


def onnx_graphs(model, tmp: Path, method: str, threads: int):
    """fp32 and int8 onnxruntime sessions of lipkit's image tower, and the int8 method used."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from lipkit.interop.onnx import ImageTower, _export
    from lipkit.interop.quant_check import session
    from lipkit.interop.quant_graph import pick_method, quantize_graph

    size = model.spec.image_size
    fp32, int8 = tmp / "image.onnx", tmp / "image.int8.onnx"
    _export(ImageTower(model), torch.zeros(2, 3, size, size), "pixel_values", "image_embeds", fp32)
    method = pick_method(method, fp32)
    rng = np.random.default_rng(0)

    def feeds():
        u8 = torch.from_numpy(rng.integers(0, 256, (128, 3, size, size), dtype=np.uint8))
        from lipkit.data.transforms import normalize

        x = normalize(u8, model.spec.image_mean, model.spec.image_std).numpy()
        return [{"pixel_values": x[s : s + 32]} for s in range(0, len(x), 32)]

    quantize_graph(fp32, int8, method, feeds)
    return session(ort, fp32, threads), session(ort, int8, threads), method


def runners(ours, peer, sessions, x):
    """One callable per variant, each encoding the batch once and returning float32 embeddings."""
    import torch
    from open_clip_train.precision import get_autocast

    from lipkit.search.encode import inference_precision, prepare_for_inference

    ours_bf16 = prepare_for_inference(copy.deepcopy(ours), "bf16")  # weights cast once, as serve does
    prepare_for_inference(ours)
    x_np = x.numpy()
    oc_autocast = {p: get_autocast(p, device_type="cpu") for p in ("fp32", "amp_bf16")}

    def oc(precision: str):
        def run():
            with torch.no_grad(), oc_autocast[precision]():
                return peer.encode_image(x, normalize=True).float()

        return run

    def lk(precision: str):
        model = ours_bf16 if precision == "bf16" else ours

        def run():
            with torch.no_grad(), inference_precision(model, precision):
                return model.encode_image(x).float()

        return run

    return {
        "open_clip fp32": oc("fp32"),
        "open_clip bf16": oc("amp_bf16"),
        "lipkit fp32": lk("fp32"),
        "lipkit bf16": lk("bf16"),
        "lipkit onnx fp32": lambda: torch.from_numpy(sessions[0].run(None, {"pixel_values": x_np})[0]),
        "lipkit onnx int8": lambda: torch.from_numpy(sessions[1].run(None, {"pixel_values": x_np})[0]),
    }


def agreement(runs) -> dict[str, float]:
    """Max |Δ| to OpenCLIP fp32 (same weights), and the lowest cosine of the bf16 and int8 variants."""
    ref = runs["open_clip fp32"]()
    out = {}
    for name, run in runs.items():
        got = run()
        out[name] = {
            "max_abs_diff": float((got - ref).abs().max()),
            "min_cosine": float((got * ref).sum(1).min()),
        }
    return out


def measure(runs, batch: int, batches: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Images/s of each variant per round (interleaved as `lipkit quantize` times its towers)."""
    from lipkit.interop.quant_check import interleaved_seconds

    def show(r: int, times: dict[str, list[float]]) -> None:
        print(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {batches * batch / v[-1]:.0f}/s" for k, v in times.items())
        )

    times = interleaved_seconds(runs, rounds, batches, warmup, show)
    return {k: [batches * batch / t for t in v] for k, v in times.items()}


def summary(rates: dict[str, list[float]]) -> dict[str, Any]:
    def spread(v: list[float]) -> dict[str, float]:
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    def ratio(a: str, b: str) -> dict[str, float]:
        return spread([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    return {
        "images_per_s": {k: spread(v) for k, v in rates.items()},
        "vs_open_clip_bf16": {k: ratio(k, "open_clip bf16") for k in rates},
        "same_precision": {f"{a} / {b}": ratio(a, b) for a, b in SAME_PRECISION},
    }


def print_table(res: dict[str, Any], agree: dict[str, Any]) -> None:
    print(f"\n{'variant':18s} {'images/s [min–max]':>24s} {'× OpenCLIP bf16':>22s} {'max|Δ| / min cos':>20s}")
    for k in VARIANTS:
        r, q, a = res["images_per_s"][k], res["vs_open_clip_bf16"][k], agree[k]
        print(
            f"{k:18s} {r['median']:9.1f} [{r['min']:.1f}–{r['max']:.1f}]".ljust(43)
            + f" {q['median']:6.2f} [{q['min']:.2f}–{q['max']:.2f}]".rjust(22)
            + f"   {a['max_abs_diff']:.1e} / {a['min_cosine']:.4f}"
        )
    print("\nsame precision:")
    for k, q in res["same_precision"].items():
        print(f"  {k:36s} {q['median']:.2f} [{q['min']:.2f}–{q['max']:.2f}]")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", type=Path, help="time this checkpoint's image tower instead of a preset")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2, help="timed batches per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--int8-method", default="auto", help="auto, static or dynamic (as lipkit quantize)")
    ap.add_argument("--omp-wait-policy", choices=["passive", "active", "inherit"], default="passive")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args(argv)
    if args.omp_wait_policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # before torch loads
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    info: dict[str, Any] = {"load_before": load(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"load before: {info['load_before']}")
    ours, peer, what = build_models(args)
    size = ours.spec.image_size
    g = torch.Generator().manual_seed(args.seed)
    u8 = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=g)
    from lipkit.data.transforms import normalize

    x = normalize(u8, ours.spec.image_mean, ours.spec.image_std)
    with tempfile.TemporaryDirectory() as tmp:
        *sessions, method = onnx_graphs(ours, Path(tmp), args.int8_method, args.threads)
    info.update(model=what, image_size=size, int8_method=method, torch=torch.__version__)
    print(f"{what}; {size} px, batch {args.batch}, {args.threads} threads, int8 {method}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")  # fmt: skip
    runs = runners(ours, peer, sessions, x)
    info["agreement"] = agreement(runs)
    print(
        f"same weights: lipkit fp32 vs OpenCLIP fp32 max |Δ| {info['agreement']['lipkit fp32']['max_abs_diff']:.1e}"
    )
    info.update(summary(measure(runs, args.batch, args.batches, args.rounds, args.warmup)))
    info["load_after"] = load()
    print_table(info, info["agreement"])
    print(f"\nload after: {info['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


if __name__ == "__main__":
    main()
