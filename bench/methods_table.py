"""The methods of docs/methods.md at equal budget, on a base that learns.

    python bench/methods_table.py                          # every row, seed 0 (6–14 min a row on 2 cores)
    python bench/methods_table.py --rows infonce,alip --seeds 0,1,2
    python bench/methods_table.py --report                 # reprint the table from the saved JSON

The base is the demo recipe (configs/demo.yaml: pretrained EfficientNet-Lite0, top 4 groups trained, the
pretrained MiniLM text tower locked) without its label caption (`data.meta_captions=[]`, which would hand
zero-shot the class names as captions), two captions per image ("label (subcategory, category)" and the
label), and a fixed budget of 100 optimiser steps of 256 (4.02 epochs of the 6,400-image table;
`train.max_minutes=0`, so a busy machine changes the time, not the numbers). Each row layers one method
preset of configs/methods on it, then the base's data settings again (two captions for every row). Rows
are evaluated on test-style and test-novel (zero-shot by the class columns, retrieval), without a
linear probe, scored as each method scores (`eval.similarity: auto`).

Rows that need something first: `clip_refine` is one epoch of CLIP-Refine from the `infonce` row's
checkpoint (same seed); `mlcd` trains on `lipkit data cluster -k 64 --labels 3` of that checkpoint's
embeddings of the training table (so it sees what a 100-step model learned, as MLCD clusters with a
trained model's features), and `priorclip` takes each image's nearest cluster of the same clustering
as its class; `plip` takes the subcategory column as identity and the category column as
an attribute — class labels as supervision, so not comparable with the caption-only rows (shown to
prove it trains end to end).

Each row's result is kept in the JSON beside --out (markdown) and not measured again (delete its entry
to remeasure); the runs are under --runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recipes import SHOWN, cpu_seconds, table  # bench/recipes.py, beside this file

from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

STEPS_EPOCHS = 4.02  # 100 steps: int(4.02 · (6,400 // 256)) = int(100.5)
LEXLIP_EPOCHS = 5.22  # 130 steps: LexLIP's 30 masked-language steps before the 100 contrastive ones
BASE = ["data.meta_captions=[]", "data.captions_per_image=2", "eval.linear_probe=", "train.eval_every=0"]
METHODS = packaged_config().parent / "methods"
ROWS: dict[str, list[str]] = {  # the cheap rows first; clip_refine, mlcd, priorclip start from infonce
    "infonce": [],
    "multi_positive": [],
    "alip": [],
    "tcl": [],
    "rs_m_clip": [],
    "siglip": [],
    "unime": [],
    "improved_baselines": [],
    "nevlp": [],
    "dreamlip": [],
    "mlcd": [],  # + data.cluster_labels, see cluster_labels
    "priorclip": [],  # + data.cluster_labels (classes: the nearest cluster)
    "plip": ["train.objective_args={identity: subcategory, attributes: [category]}"],
    "clip_refine": [],  # + model.init_from, see run_row
    "filip": [],
    "wukong": [],
    "lexlip_contrastive": ["train.objective_args.bottleneck_steps=0"],  # the contrastive stage alone
    "lexlip": [
        f"train.epochs={LEXLIP_EPOCHS}"
    ],  # its preset's 30 masked steps, then the same 100 contrastive
}
PRESET = {"lexlip_contrastive": "lexlip"}  # rows whose preset is another row's (default: the row's name)


def cluster_labels(runs: Path, seed: int) -> Path:
    """MLCD's labels: k-means (k 64, 3 labels per image) on the infonce row's embeddings of the table."""
    start = runs / f"infonce-s{seed}" / "checkpoint"
    if not start.is_dir():
        raise SystemExit(f"the mlcd row clusters with {start}; run the infonce row with this seed first.")
    out = runs / f"clusters-s{seed}"
    if not (out / "cluster.json").is_file():
        lipkit = Path(sys.executable).parent / "lipkit"
        train = default_root() / "train.jsonl"
        cmd = [str(lipkit), "data", "cluster", str(start), str(train), str(out), "-k", "64", "--labels", "3"]
        subprocess.run(cmd, check=True)
    return out


def run_row(name: str, seed: int, runs: Path) -> dict:
    root = default_root()
    out = runs / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a row that broke off earlier starts again
    data = [
        f"data.train={root / 'train.jsonl'}",
        f"train.output={out}",
        "data.eval={" + ", ".join(f"'{s}': '{root / s}.jsonl'" for s in ("test-style", "test-novel")) + "}",
    ]
    budget = [f"train.epochs={STEPS_EPOCHS}", "train.max_minutes=0"]
    extra = list(ROWS[name])
    if name == "clip_refine":  # post-pre-training: its preset's one epoch from the infonce row
        start = runs / f"infonce-s{seed}" / "checkpoint"
        if not start.is_dir():
            raise SystemExit(f"the clip_refine row starts from {start}; run the infonce row first.")
        budget, extra = [], [f"model.init_from={start}"]
    if name in ("mlcd", "priorclip"):
        extra.append(f"data.cluster_labels={cluster_labels(runs, seed)}")
    layers = [packaged_config(), METHODS / f"{PRESET.get(name, name)}.yaml"]
    cfg = load_config(layers, [*data, *BASE, f"train.seed={seed}", *budget, *extra])
    c0, t0 = cpu_seconds(), time.perf_counter()
    run_dir, result = run_training(cfg)
    cpu = cpu_seconds() - c0
    results = run_eval(run_dir / "checkpoint", cfg.data.eval, cfg, run_dir / "eval" / "results.json")
    lexicon = {  # LexLIP rows: the mean non-zero terms per image and per caption (a sparse index's cost)
        f"{s}/{m}": v
        for s in results["splits"]
        for m, v in results["splits"][s]["metrics"].items()
        if m.startswith("lexicon/")
    }
    return {
        **({"lexicon": lexicon} if lexicon else {}),
        "row": name,
        "seed": seed,
        "metrics": {f"{s}/{m}": results["splits"][s]["metrics"][m] for s, m in SHOWN},
        "chance": {f"{s}/{m}": results["splits"][s]["chance"][m] for s, m in SHOWN},
        "steps": result.steps,
        "samples": result.samples,
        "samples_per_s": result.samples / max(result.seconds, 1e-9),
        "cpu_minutes": cpu / 60,
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # its own process
    }


def run_isolated(name: str, seed: int, runs: Path) -> dict:
    """One row in a fresh process, so its peak memory is its own and nothing leaks between rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--rows", name, "--seeds", str(seed), "--runs", str(runs)]
        subprocess.run([*cmd, "--child", str(out)], check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs", type=Path, default=Path("runs/methods"))
    ap.add_argument("--out", type=Path, default=Path("docs/methods-equal-budget.md"))
    ap.add_argument("--report", action="store_true", help="reprint the table from the saved JSON")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # run one row here, write its JSON there
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    runs = json.loads(raw.read_text()) if raw.is_file() else []
    if args.report:
        print(table(runs))
        return
    build_emoji(default_root())
    if args.child:
        args.child.write_text(json.dumps(run_row(args.rows, int(args.seeds), args.runs)))
        return
    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            if any((r["row"], r["seed"]) == (name, seed) for r in runs):
                continue  # measured already (delete its entry from the JSON to measure again)
            try:
                runs.append(run_isolated(name, seed, args.runs))
            except subprocess.CalledProcessError as e:  # one broken row does not lose the others
                print(f"row {name} seed {seed} failed ({e}); its log is above", flush=True)
                continue
            args.out.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text(json.dumps(runs, indent=2))
            args.out.write_text(table(runs) + "\n")
            print(table(runs), flush=True)


if __name__ == "__main__":
    main()
