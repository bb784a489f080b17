"""VPGTrans on the emoji data: a connector transferred from one language model to a wider one against a
connector trained from scratch on the wider one, at equal steps (docs/captioning.md).

    make demo                                          # runs/demo/checkpoint: the towers every run reads
    python bench/connector_transfer.py --seeds 0       # ~75 min a seed on 2 cores
    python bench/connector_transfer.py --report        # reprint the table from the saved JSON

On the demo checkpoint's locked towers, two language models are pre-trained on the training captions alone
(configs/methods/text_lm.yaml, --lm-steps each): "small" at the embedding width (256, 2 layers) and "wide"
(--wide-width, 3 layers). A connector is trained on the small one (configs/methods/connector.yaml,
--source-steps). Then, on the wide one, for each budget N in --budgets (optimiser steps on the target):

- scratch: a fresh connector trained for N steps;
- vpgtrans: the small model's connector transferred (its VPG copied, its projector merged with the word
  converter between the two models' word embeddings), --warmup steps of projector warm-up at 5× the
  learning rate (configs/methods/vpgtrans.yaml), then N − warmup steps of fine-tuning of the whole connector;
- vpgtrans at 0 steps: the transferred connector as initialised (one step at lr 1e-12, which moves no
  weight measurably), to show what the transfer alone carries.

Every target run uses the demo recipe's learning rate with no learning-rate warm-up (the budgets are short);
`train.max_minutes=0` (a busy machine changes the time, not the numbers). Each connector captions --images
test-style images (beam 3) scored with BLEU-4 (add-one smoothed) and CIDEr-D against the image's English
captions. CLIP-score is left out: every run reads the towers of runs/demo, the only judge there is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from recipes import fixed_steps, mean_std  # bench/recipes.py, beside this file

from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

METRICS = ("captions/BLEU-4", "captions/CIDEr-D")


def train(preset: str, out: Path, seed: int, steps: int, args, extra=()) -> int:
    """configs/demo.yaml under configs/methods/`preset` for `steps` optimiser steps into `out`; steps run.
    With --reuse, a finished run of that many steps already in `out` is kept."""
    if args.reuse and (out / "checkpoint").is_dir() and _steps_logged(out) == steps:
        return steps
    sets = [*fixed_steps(out, seed, steps, args.batch, default_root() / "train.jsonl"), *extra]
    cfg = load_config([packaged_config(), packaged_config().parent / "methods" / preset], sets)
    _, result = run_training(cfg)
    if result.steps != steps:  # the arms compare at equal steps
        raise SystemExit(f"{out} ran {result.steps} steps, not {steps}")
    return result.steps


def _steps_logged(run: Path) -> int:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max((int(r.get("step", 0)) for r in lines), default=0)


def caption_scores(run: Path, args) -> dict:
    """BLEU-4 and CIDEr-D of --images test-style captions of `run`'s checkpoint (lipkit eval's)."""
    root = default_root()
    cfg = load_config([packaged_config(), packaged_config().parent / "methods" / "connector.yaml"], [])
    ev = dataclasses.replace(
        cfg.eval, caption_max_images=args.images, caption_langs=["en"], class_columns=["subcategory"]
    )
    cfg = dataclasses.replace(cfg, eval=ev)
    res = run_eval(
        run / "checkpoint", {"test-style": str(root / "test-style.jsonl")}, cfg, run / "eval" / "results.json"
    )
    split = res["splits"]["test-style"]
    return {"metrics": {m: split["metrics"][m] for m in METRICS}, "examples": split.get("captions", [])[:3]}


def run_seed(seed: int, args: argparse.Namespace) -> list[dict]:
    runs, rows = args.runs / f"s{seed}", []
    small, wide, source = runs / "lm-small", runs / "lm-wide", runs / "connector-small"
    base = [f"model.init_from={args.base}"]
    t0 = time.perf_counter()
    train("text_lm.yaml", small, seed, args.lm_steps, args, base)
    wide_shape = [f"model.overrides.caption_width={args.wide_width}", "model.overrides.caption_layers=3"]
    train("text_lm.yaml", wide, seed, args.lm_steps, args, base + wide_shape)
    lm = f"model.init_from={small / 'checkpoint'}"
    train("connector.yaml", source, seed, args.source_steps, args, [lm])
    rows.append(
        {"row": "source: small LM", "seed": seed, "steps": args.source_steps, **caption_scores(source, args)}
    )
    target = [f"model.init_from={wide / 'checkpoint'}", "train.warmup_steps=0"]
    transfer = [f"train.objective_args.transfer_from={source / 'checkpoint'}"]
    untrained = runs / "vpgtrans-0"  # the transferred connector as initialised: one step at lr 1e-12
    train("vpgtrans.yaml", untrained, seed, 1, args, target + transfer + ["train.lr=1e-12"])
    rows.append({"row": "vpgtrans", "seed": seed, "steps": 0, **caption_scores(untrained, args)})
    for n in (int(b) for b in args.budgets.split(",")):
        scratch = runs / f"scratch-{n}"
        train("connector.yaml", scratch, seed, n, args, target)
        rows.append({"row": "scratch", "seed": seed, "steps": n, **caption_scores(scratch, args)})
        warm, tuned = runs / f"vpgtrans-warmup-{n}", runs / f"vpgtrans-{n}"
        train("vpgtrans.yaml", warm, seed, args.warmup, args, target + transfer)
        tune = [f"model.init_from={warm / 'checkpoint'}", "train.warmup_steps=0"]
        train("connector.yaml", tuned, seed, n - args.warmup, args, tune)
        rows.append({"row": "vpgtrans", "seed": seed, "steps": n, **caption_scores(tuned, args)})
    for r in rows:
        r["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    return rows


def table(saved: list[dict]) -> str:
    lines = ["| connector (on the wide LM unless named) | steps | seeds | BLEU-4 | CIDEr-D |"]
    lines.append("|---|---|---|---|---|")
    keys = sorted(
        {(r["row"], r["steps"]) for r in saved}, key=lambda k: (k[0] != "source: small LM", k[1], k[0])
    )
    for name, steps in keys:
        rows = [r for r in saved if (r["row"], r["steps"]) == (name, steps)]
        cells = [mean_std([r["metrics"][m] for r in rows]) for m in METRICS]
        lines.append(f"| {name} | {steps} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--base", type=Path, default=Path("runs/demo/checkpoint"), help="the towers (make demo)")
    ap.add_argument("--lm-steps", type=int, default=100, help="pre-training steps of each language model")
    ap.add_argument("--wide-width", type=int, default=384, help="the second language model's width")
    ap.add_argument("--source-steps", type=int, default=120, help="steps of the small model's connector")
    ap.add_argument("--budgets", default="10,40", help="steps on the wide model, comma-separated")
    ap.add_argument("--warmup", type=int, default=3, help="of which VPGTrans's projector warm-up")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=200, help="test-style images captioned")
    ap.add_argument("--runs", type=Path, default=Path("runs/connector-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/connector-bench.md"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs already in --runs")
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    saved = json.loads(raw.read_text()) if raw.is_file() else []
    if args.report:
        print(table(saved))
        return
    if not args.base.is_dir():
        raise SystemExit(f"The starting checkpoint {args.base} does not exist: run `make demo` first.")
    if any(int(b) <= args.warmup for b in args.budgets.split(",")):
        raise SystemExit(f"Every budget must exceed the {args.warmup} warm-up steps.")
    build_emoji(default_root())
    for seed in (int(s) for s in args.seeds.split(",")):
        if any(r["seed"] == seed for r in saved):
            continue
        saved += run_seed(seed, args)
        raw.write_text(json.dumps(saved, indent=2, ensure_ascii=False))
        args.out.write_text(table(saved) + "\n")
        print(table(saved), flush=True)


if __name__ == "__main__":
    main()
