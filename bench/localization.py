"""CLOC's region–text contrast vs CLIP's loss alone on the canvases, at equal budget (docs/localization.md).

    lipkit data build canvases
    python bench/localization.py --seeds 0            # both arms (~25 min a seed on 2 cores)
    python bench/localization.py --report             # reprint the table from the saved JSON

Both arms train what docs/localization.md's command trains — configs/demo.yaml under
configs/methods/cloc.yaml: the demo's pretrained towers at 256 px on the training canvases, augmentation
off — for --steps optimiser steps of --batch canvases (`train.max_minutes=0`: a busy machine changes the
time, not the numbers). "clip" sets region_weight 0 (InfoNCE exactly), "cloc" keeps the preset's 1. Each
checkpoint is evaluated on the test canvases (held-out artist) — region → caption R@1 and its whole-image
baseline (the crop's image embedding), the pointing game of each heat map, zero-shot segmentation and
its context-prompted variant against the all-foreground baseline, multi-label mAP over the per-object
subcategories — and on the emoji test-style images: image-level zero-shot subcategory top-1, what the
region loss must not cost. The last row gives chance (for segmentation: the all-foreground baseline).

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

from recipes import fixed_steps, mean_std  # bench/recipes.py, beside this file

from lipkit.config import load_config, packaged_config
from lipkit.data.builtin.canvases import default_out
from lipkit.data.emoji import build_emoji, default_root
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

SHOWN = [
    ("canvases", "regions/region_to_text/R@1"),
    ("canvases", "regions/crop_to_text/R@1"),
    ("canvases", "localization/pointing/similarity"),
    ("canvases", "localization/pointing/gradcam"),
    ("canvases", "localization/segmentation/mIoU"),
    ("canvases", "localization/segmentation/context_mIoU"),
    ("canvases", "zeroshot/subcategory/mAP"),
    ("test-style", "zeroshot/subcategory/top1"),
]
ARMS = {"clip": ["train.objective_args.region_weight=0.0"], "cloc": []}


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    canvases, emoji = default_out(), default_root()
    out = args.runs / f"{arm}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    splits = {"canvases": str(canvases / "test.jsonl"), "test-style": str(emoji / "test-style.jsonl")}
    sets = [*fixed_steps(out, seed, args.steps, args.batch, canvases / "train.jsonl"), *ARMS[arm]]
    cfg = load_config([packaged_config(), packaged_config().parent / "methods" / "cloc.yaml"], sets)
    t0 = time.perf_counter()
    run_dir, result = run_training(cfg)
    full = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=splits))
    results = run_eval(run_dir / "checkpoint", splits, full, run_dir / "eval" / "results.json")
    return {
        "arm": arm,
        "seed": seed,
        "steps": result.steps,
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "metrics": {f"{s}/{m}": results["splits"][s]["metrics"].get(m) for s, m in SHOWN},
        "chance": {f"{s}/{m}": results["splits"][s]["chance"].get(m) for s, m in SHOWN},
    }


def table(runs: list[dict]) -> str:
    head = "| arm | seeds | steps | " + " | ".join(f"{s} {m}" for s, m in SHOWN) + " |"
    lines = [head, "|---" * (len(SHOWN) + 3) + "|"]
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        if rows:
            cells = [mean_std([r["metrics"][f"{s}/{m}"] * 100 for r in rows]) for s, m in SHOWN]
            lines.append(f"| {arm} | {len(rows)} | {rows[0]['steps']} | " + " | ".join(cells) + " |")
    if runs:
        chance = runs[0]["chance"]
        cells = [
            f"{chance[f'{s}/{m}'] * 100:.1f}" if chance.get(f"{s}/{m}") is not None else "–" for s, m in SHOWN
        ]
        lines.append("| chance / baseline | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps of each arm")
    ap.add_argument("--batch", type=int, default=128, help="canvases per step")
    ap.add_argument("--runs", type=Path, default=Path("runs/localization-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/localization-equal-budget.md"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    saved = json.loads(raw.read_text()) if raw.is_file() else []
    if args.report:
        print(table(saved))
        return
    build_emoji(default_root())
    if not (default_out() / "test.jsonl").is_file():
        sys.exit("Build the canvases first: lipkit data build canvases")
    if args.child:
        args.child.write_text(json.dumps(run_arm(args.arms, int(args.seeds), args)))
        return
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            if any((r["arm"], r["seed"]) == (arm, seed) for r in saved):
                continue
            with tempfile.TemporaryDirectory() as tmp:  # a fresh process per run
                out = Path(tmp) / "run.json"
                cmd = [sys.executable, __file__, "--arms", arm, "--seeds", str(seed), "--child", str(out)]
                cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--runs", str(args.runs)]
                subprocess.run(cmd, check=True)
                saved.append(json.loads(out.read_text()))
            raw.write_text(json.dumps(saved, indent=2))
            args.out.write_text(table(saved) + "\n")
            print(table(saved), flush=True)


if __name__ == "__main__":
    main()
