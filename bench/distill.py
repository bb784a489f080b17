"""A small student trained from scratch vs distilled from a teacher checkpoint, at equal budget.

    make demo                                                  # the teacher: runs/demo/checkpoint
    python bench/distill.py --seeds 0,1,2                      # both arms, 3 seeds (docs/distill.md)
    python bench/distill.py --report                           # reprint the table from the saved JSON

Both arms are what docs/distill.md's command trains — `lipkit distill runs/demo/checkpoint -c
configs/demo.yaml`: the `micro` student (--student) on the demo's data and augmentation settings
(configs/demo.yaml under configs/methods/distill.yaml; the objective reads each image's first caption,
"label (subcategory, category)"), the teacher's tokenizer — at a fixed number of optimiser steps
(`train.max_minutes=0`: a busy machine changes the time, not the numbers). "scratch" trains InfoNCE
alone; "distilled" adds the preset's teacher terms. Rows are evaluated on test-style and test-novel
(zero-shot by the class columns, retrieval), without a linear probe. The table also gives each model's inference parameters (a locked tower counts) and images/s
embedding test-style (the eval settings: bf16 where the CPU computes it, else fp32; batch 256), teacher and student in the same process.

Each run's result is kept in the JSON beside --out and not measured again (delete its entry to remeasure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from recipes import mean_std  # bench/recipes.py, beside this file

from lipkit.checkpoint import load_checkpoint
from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.device import use_bf16
from lipkit.eval.evaluate import embed_images
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

SHOWN = [
    ("test-style", "zeroshot/subcategory/top1"),
    ("test-style", "zeroshot/category/top1"),
    ("test-style", "retrieval/text_to_image/R@1"),
    ("test-style", "retrieval/image_to_text/R@1"),
    ("test-novel", "retrieval/text_to_image/R@1"),
]
BASE = ["eval.linear_probe=", "train.eval_every=0", "train.max_minutes=0"]
ARMS = {"scratch": ["train.objective=infonce", "train.objective_args={}"], "distilled": []}


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    root, teacher = default_root(), args.teacher.resolve()
    out = args.runs / f"{arm}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [
        f"data.train={root / 'train.jsonl'}",
        "data.eval={" + ", ".join(f"'{s}': '{root / s}.jsonl'" for s in ("test-style", "test-novel")) + "}",
        f"train.output={out}",
        f"model.preset={args.student}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        *BASE,
    ]
    if arm == "scratch":  # the same student and tokenizer, no teacher
        sets += [f"tokenizer.path={teacher / 'tokenizer.json'}", *ARMS[arm]]
    else:
        sets += [f"train.teacher={teacher}"]
    cfg = load_config([packaged_config(), packaged_config().parent / "methods" / "distill.yaml"], sets)
    t0 = time.perf_counter()
    # evaluated once, below (with data.eval set the trainer would evaluate its last step too)
    run_dir, result = run_training(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval={})))
    results = run_eval(run_dir / "checkpoint", cfg.data.eval, cfg, run_dir / "eval" / "results.json")
    return {
        "arm": arm,
        "seed": seed,
        "metrics": {f"{s}/{m}": results["splits"][s]["metrics"][m] for s, m in SHOWN},
        "steps": result.steps,
        "train_samples_per_s": result.samples / max(result.seconds, 1e-9),
        "wall_minutes": (time.perf_counter() - t0) / 60,
    }


def speed(checkpoint: Path, images: int = 1024) -> dict:
    """Inference parameters and images/s embedding the first `images` test-style images (bf16, batch 256,
    decoded up front, best of 3)."""
    model, _, _ = load_checkpoint(checkpoint)
    store = ImageStore(
        read_table(default_root() / "test-style.jsonl")[:images], model.spec.image_size, cache=True
    )
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16("bf16", "cpu")):
        embed_images(model, store, 256)  # warm-up (and the decode)
        for _ in range(3):
            t0 = time.perf_counter()
            embed_images(model, store, 256)
            best = min(best, time.perf_counter() - t0)
    return {"params": sum(p.numel() for p in model.parameters()), "images_per_s": images / best}


def table(runs: list[dict], speeds: dict) -> str:
    lines = [
        "| arm | seeds | " + " | ".join(f"{s} {m}" for s, m in SHOWN) + " | steps |",
        "|---" * (len(SHOWN) + 3) + "|",
    ]
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        cells = [mean_std([r["metrics"][f"{s}/{m}"] * 100 for r in rows]) for s, m in SHOWN]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + f" | {rows[0]['steps']} |")
    for name, sp in speeds.items():
        lines.append(
            f"\n{name}: {sp['params'] / 1e6:.2f}M inference parameters, {sp['images_per_s']:.0f} images/s"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--student", default="micro", help="model preset of the student")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=float, default=8.04, help="8.04: 200 steps of 256 on the emoji table")
    ap.add_argument("--runs", type=Path, default=Path("runs/distill-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/distill-equal-budget.md"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    saved = json.loads(raw.read_text()) if raw.is_file() else {"runs": [], "speeds": {}}
    if args.report:
        print(table(saved["runs"], saved["speeds"]))
        return
    build_emoji(default_root())
    if args.child:
        args.child.write_text(json.dumps(run_arm(args.arms, int(args.seeds), args)))
        return
    for arm in args.arms.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            if any((r["arm"], r["seed"]) == (arm, seed) for r in saved["runs"]):
                continue
            with tempfile.TemporaryDirectory() as tmp:  # a fresh process per run
                out = Path(tmp) / "run.json"
                cmd = [sys.executable, __file__, "--arms", arm, "--seeds", str(seed), "--child", str(out)]
                cmd += [
                    "--teacher",
                    str(args.teacher),
                    "--student",
                    args.student,
                    "--epochs",
                    str(args.epochs),
                ]
                subprocess.run([*cmd, "--runs", str(args.runs)], check=True)
                saved["runs"].append(json.loads(out.read_text()))
            raw.write_text(json.dumps(saved, indent=2))
    student = args.runs / f"distilled-s{args.seeds.split(',')[0]}" / "checkpoint"
    if student.is_dir():
        saved["speeds"] = {"teacher": speed(args.teacher), "student": speed(student)}
    raw.write_text(json.dumps(saved, indent=2))
    args.out.write_text(table(saved["runs"], saved["speeds"]) + "\n")
    print(table(saved["runs"], saved["speeds"]))


if __name__ == "__main__":
    main()
