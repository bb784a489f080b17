"""Grown from small vs large from the start, at equal compute (docs/growth.md).

    python bench/growth.py --seeds 0,1,2          # both arms, 3 seeds (~10 min a run on 2 cores)
    python bench/growth.py --report               # reprint the table from the saved JSON

Both arms train the tiny preset's shape from scratch with configs/scratch.yaml's data, augmentation and
evaluation (64 px, a BPE tokenizer trained on the captions), as one architecture at the end: towers
192 wide with 6 heads of 32, 6 image and 4 text blocks. "large" is that model from step 0 for --steps
steps. "grown" starts at half width (96, 3 heads) with 4 image and 2 text blocks and grows after
--grow-at steps (`train.grow: [{at_step, towers: both, width: 2, depth: 2}]`), then trains for as many
more steps as make its process CPU time equal the large arm's: its pre-growth steps cost a fraction r
of a large step (the training loop's seconds per step of the large run and of a short probe of the
small model, each in a fresh process on an otherwise idle machine), so it trains --steps + grow_at·(1 − r)
steps in all. Process CPU time and
test-style / test-novel zero-shot and R@1 are reported for each.

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
from pathlib import Path

from recipes import cpu_seconds, mean_std  # bench/recipes.py, beside this file

from lipkit.config import load_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

ROOT = Path(__file__).resolve().parents[1]
SHOWN = [
    ("test-style", "zeroshot/subcategory/top1"),
    ("test-style", "retrieval/text_to_image/R@1"),
    ("test-novel", "retrieval/text_to_image/R@1"),
]
LARGE = (
    "{vision_width: 192, vision_heads: 6, vision_layers: 6, text_width: 192, text_heads: 6, text_layers: 4}"
)
SMALL = "{vision_width: 96, vision_heads: 3, vision_layers: 4, text_width: 96, text_heads: 3, text_layers: 2}"


def train(arm: str, seed: int, steps: int, args: argparse.Namespace) -> dict:
    root, out = default_root(), args.runs / f"{arm}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [
        f"data.train={root / 'train.jsonl'}",
        f"train.output={out}",
        f"train.seed={seed}",
        "train.max_minutes=0",
        "train.eval_every=0",
        "data.eval={}",  # evaluated once, below
        f"train.epochs={steps / (6448 // 256) + 1e-6}",
        f"model.overrides={LARGE if arm == 'large' else SMALL}",
    ]
    if arm == "grown":
        sets.append(f"train.grow=[{{at_step: {args.grow_at}, towers: both, width: 2, depth: 2}}]")
    cfg = load_config(ROOT / "configs" / "scratch.yaml", sets)
    c0 = cpu_seconds()
    run_dir, result = run_training(cfg)
    cpu = cpu_seconds() - c0
    evals = {s: str(root / f"{s}.jsonl") for s in ("test-style", "test-novel")}
    full = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=evals))
    results = run_eval(run_dir / "checkpoint", evals, full, run_dir / "eval" / "results.json")
    return {
        "arm": arm,
        "seed": seed,
        "steps": result.steps,
        "cpu_minutes": cpu / 60,
        "train_s_per_step": result.seconds / max(result.steps, 1),  # the training loop alone
        "metrics": {f"{s}/{m}": results["splits"][s]["metrics"][m] for s, m in SHOWN},
    }


def table(runs: list[dict]) -> str:
    head = "| arm | seeds | steps | CPU-min | " + " | ".join(f"{s} {m}" for s, m in SHOWN) + " |"
    lines = [head, "|---" * (len(SHOWN) + 4) + "|"]
    for arm in ("large", "grown"):
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        cells = [mean_std([r["metrics"][f"{s}/{m}"] * 100 for r in rows]) for s, m in SHOWN]
        cpu = sum(r["cpu_minutes"] for r in rows) / len(rows)
        lines.append(f"| {arm} | {len(rows)} | {rows[0]['steps']} | {cpu:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def child(arm: str, seed: int, steps: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # a fresh process per run: its own CPU time and memory
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, __file__, "--child", str(out), "--arm", arm, "--seeds", str(seed)]
        cmd += ["--steps", str(steps), "--grow-at", str(args.grow_at), "--runs", str(args.runs)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=200, help="the large arm's optimiser steps")
    ap.add_argument("--grow-at", type=int, default=100)
    ap.add_argument("--probe", type=int, default=12, help="steps of the small model that measure its cost")
    ap.add_argument("--runs", type=Path, default=Path("runs/growth-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/growth-equal-compute.md"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    saved = json.loads(raw.read_text()) if raw.is_file() else []
    if args.report:
        print(table(saved))
        return
    build_emoji(default_root())
    if args.child:
        args.child.write_text(json.dumps(train(args.arm, int(args.seeds), args.steps, args)))
        return
    for seed in (int(s) for s in args.seeds.split(",")):
        if any((r["arm"], r["seed"]) == ("large", seed) for r in saved) and any(
            (r["arm"], r["seed"]) == ("grown", seed) for r in saved
        ):
            continue
        large = child("large", seed, args.steps, args)
        probe = child("probe", seed, args.probe, args)  # the small model alone, a few steps
        ratio = min(1.0, probe["train_s_per_step"] / large["train_s_per_step"])
        grown = child("grown", seed, round(args.steps + args.grow_at * (1 - ratio)), args)
        grown["small_to_large_step_cost"] = ratio
        saved += [large, grown]
        raw.write_text(json.dumps(saved, indent=2))
        args.out.write_text(table(saved) + "\n")
        print(table(saved), flush=True)


if __name__ == "__main__":
    main()
