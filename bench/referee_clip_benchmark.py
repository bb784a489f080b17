"""CLIP_benchmark as an independent referee of `lipkit eval` (not a test; tests/test_clip_benchmark_referee.py
runs the same functions on a tiny model).

    python bench/referee_clip_benchmark.py                                   # runs/demo/checkpoint, test-style
    python bench/referee_clip_benchmark.py --checkpoint runs/recipes/demo-s1/checkpoint --json runs/referee.json

What it does:
1. Exports the checkpoint to OpenCLIP (`lipkit checkpoint convert --to open_clip`, lipkit.interop.open_clip).
2. Writes two evaluation sets from SOURCE in CLIP_benchmark's WebDataset layout with
   `lipkit data export-eval` (lipkit.data.eval_export): a classification set over `--classes` (with
   lipkit's eval.templates, written as `{c}` templates), and a retrieval set of each sample's first
   caption, keeping only samples whose caption no other sample has (`--unique-captions`).
3. Runs CLIP_benchmark's own command (`clip_benchmark eval --model_type open_clip --model local-dir:OUT
   --no_amp`, in this process) on both sets: its dataset reader, OpenCLIP's preprocess and tokenizer, its
   zero-shot classifier and its recall@K.
4. Runs `lipkit eval` (lipkit's model, decoding and metrics; fp32) on the same sets, with
   `eval.protocol: clip_benchmark` and with lipkit's own protocol, and prints both against
   CLIP_benchmark's numbers; exits 1 when a compatible-mode number differs by more than `--tolerance`
   points.

One patch to CLIP_benchmark 1.6.2: its `accuracy` converts a one-element array with `float()`, which
NumPy ≥ 2.4 refuses; the patched copy computes the same counts with `.item()`. Nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CB_KEYS = {  # CLIP_benchmark metric -> lipkit metric
    "zeroshot_classification": {
        "acc1": "zeroshot/class/top1",
        "acc5": "zeroshot/class/top5",
        "mean_per_class_recall": "zeroshot/class/mean_recall",
    },
    "zeroshot_retrieval": {
        f"{cb}_retrieval_recall@{k}": f"retrieval/{ours}/R@{k}"
        for k in (1, 5, 10)
        for cb, ours in (("image", "text_to_image"), ("text", "image_to_text"))
    },
}
SETS = {"zeroshot_classification": "cls", "zeroshot_retrieval": "ret"}


@contextmanager
def numpy2_accuracy():
    """CLIP_benchmark's `accuracy` with `.item()` in place of `float(ndarray)` (NumPy ≥ 2.4)."""
    from clip_benchmark.metrics import zeroshot_classification as zc

    original = zc.accuracy

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    zc.accuracy = accuracy
    try:
        yield
    finally:
        zc.accuracy = original


def write_sets(source: str | Path, classes: str, out: Path, templates: list[str]) -> dict[str, Path]:
    """The classification and unique-caption retrieval sets, as `lipkit data export-eval` writes them."""
    from lipkit.data.eval_export import export_eval_set

    export_eval_set(source, out / SETS["zeroshot_classification"], "clip-benchmark", classes, templates)
    export_eval_set(
        source, out / SETS["zeroshot_retrieval"], "clip-benchmark", all_captions=False, unique_captions=True
    )
    return {task: out / name for task, name in SETS.items()}


def run_clip_benchmark(
    open_clip_dir: Path, sets: dict[str, Path], work: Path, batch_size: int
) -> dict[str, Any]:
    """CLIP_benchmark's own `clip_benchmark eval` on each set: {task: its metrics}."""
    from clip_benchmark import cli

    out: dict[str, Any] = {}
    for task, root in sets.items():
        result = work / f"clip_benchmark_{task}.json"
        argv = [
            "clip_benchmark",
            "eval",
            "--model_type",
            "open_clip",
            "--model",
            f"local-dir:{open_clip_dir}",
        ]
        argv += ["--pretrained", "", "--dataset", f"wds/{root.name}", "--dataset_root", str(root)]
        argv += ["--task", task, "--no_amp", "--num_workers", "0", "--batch_size", str(batch_size)]
        argv += ["--recall_k", "1", "5", "10", "--output", str(result), "--quiet"]
        saved = sys.argv
        sys.argv = argv
        try:
            with numpy2_accuracy():
                cli.main()
        finally:
            sys.argv = saved
        out[task] = json.loads(result.read_text())["metrics"]
    return out


def run_lipkit(checkpoint: Path, sets: dict[str, Path], work: Path, protocol: str, batch_size: int) -> dict:
    """`lipkit eval` on each set (fp32): {task: metrics}."""
    from lipkit.config import load_config
    from lipkit.eval.suite import run_eval

    cfg = load_config(
        None, [f"eval.protocol={protocol}", f"eval.batch_size={batch_size}", "eval.precision=fp32"]
    )
    splits = {task: str(root) for task, root in sets.items()}
    results = run_eval(checkpoint, splits, cfg, work / f"lipkit_{protocol}.json")
    return {task: results["splits"][task]["metrics"] for task in sets}


def compare(cb: dict[str, Any], lipkit_runs: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per CLIP_benchmark metric: its value ("peer") and each lipkit protocol's, in points."""
    rows = []
    for task, keys in CB_KEYS.items():
        for cb_key, ours in keys.items():
            row = {"task": task, "metric": cb_key, "lipkit_metric": ours, "peer": 100 * cb[task][cb_key]}
            for protocol, metrics in lipkit_runs.items():
                row[protocol] = 100 * metrics[task][ours]
            rows.append(row)
    return rows


def referee(checkpoint: Path, source: str, classes: str, work: Path, batch_size: int = 256) -> list[dict]:
    """Steps 1–4 of the module docstring in `work`; the comparison rows."""
    from lipkit.checkpoint import load_checkpoint
    from lipkit.config import EvalConfig
    from lipkit.interop.open_clip import write_open_clip

    model, tokenizer, _ = load_checkpoint(checkpoint)
    open_clip_dir = write_open_clip(model, tokenizer, work / "open_clip")
    sets = write_sets(source, classes, work / "sets", EvalConfig().templates)
    cb = run_clip_benchmark(open_clip_dir, sets, work, batch_size)
    ours = {p: run_lipkit(checkpoint, sets, work, p, batch_size) for p in ("clip_benchmark", "lipkit")}
    return compare(cb, ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument(
        "--source", default=str(Path("~/.cache/lipkit/datasets/emoji/test-style.jsonl").expanduser())
    )
    ap.add_argument("--classes", default="subcategory", help="metadata column of the classification set")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=0.1, help="points")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = referee(args.checkpoint, args.source, args.classes, Path(tmp), args.batch_size)
    print(f"{'CLIP_benchmark metric':34} {'CLIP_benchmark':>14} {'lipkit compat':>14} {'lipkit own':>11}")
    for r in rows:
        print(f"{r['metric']:34} {r['peer']:14.2f} {r['clip_benchmark']:14.2f} {r['lipkit']:11.2f}")
    worst = max(abs(r["clip_benchmark"] - r["peer"]) for r in rows)
    print(f"largest |CLIP_benchmark - lipkit compat|: {worst:.3f} points (tolerance {args.tolerance})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if worst > args.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
