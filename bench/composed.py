"""Composed image retrieval on the demo checkpoint: a reference emoji plus words ("with dark skin tone") must
find the variant they describe, among every image of the split (the reference left out).

    python bench/composed.py                 # builds the benchmark, trains pic2word then rtd, evaluates all
    python bench/composed.py --report        # reprint the table from docs/composed-bench.json

Rows: the demo checkpoint's image-only, text-only and summed queries (no training), Pic2Word's mapping
network trained on the training table's images (`lipkit adapt --method pic2word`), and RTD's text tower
tuned from it on the training table's composed queries as text triplets (`--method rtd`). Scored on test
(test-style: the held-out artist) and novel (test-novel: concepts never trained on); text→image R@1 of the
split's captions is shown too (RTD's tuned text tower answers plain text queries as well).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from lipkit.adapt.run import adapt_checkpoint
from lipkit.config import load_config, packaged_config
from lipkit.data.builtin.composed import build_composed, default_out
from lipkit.eval.suite import run_eval

WAYS = ("image", "text", "sum", "pic2word", "rtd")
SPLITS = ("test", "novel")


def cpu_minutes() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) / 60


def evaluate(checkpoint: Path, bench: Path, out: Path) -> dict:
    cfg = load_config(
        [packaged_config()], ["eval.class_columns=[]", "eval.linear_probe=", "eval.precision=fp32"]
    )
    splits = {s: str(bench / f"{s}.jsonl") for s in SPLITS}
    results = run_eval(checkpoint, splits, cfg, out)
    out = {}
    for s in SPLITS:
        split = results["splits"][s]
        out[s] = {**split["metrics"], **{f"chance/{k}": v for k, v in split["chance"].items()}}
    return out


def arm(name: str, source: Path, data: Path, runs: Path, bench: Path, **settings) -> dict:
    t0, c0 = time.time(), cpu_minutes()
    info = adapt_checkpoint(source, data, None, runs / name, overwrite=True, method=name, **settings)
    trained = {"cpu_min": round(cpu_minutes() - c0, 1), "wall_min": round((time.time() - t0) / 60, 1)}
    return {
        "adapted": info,
        "training": trained,
        "metrics": evaluate(runs / name / "checkpoint", bench, runs / name / "eval.json"),
    }


ROWS = (  # (shown as, arm, way)
    ("image", "demo", "image"),
    ("text", "demo", "text"),
    ("sum", "demo", "sum"),
    ("pic2word", "pic2word", "pic2word"),
    ("rtd", "rtd", "rtd"),
    ("sum with rtd's text tower", "rtd", "sum"),
)


def table(saved: dict) -> str:
    lines = [
        "| query | trains | test R@1 | test R@10 | novel R@1 | novel R@10 | test text→image R@1 | novel text→image R@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shown, name, way in ROWS:
        source = saved.get(name)
        if source is None:
            continue
        m = source["metrics"]
        cells = [100 * m[s][f"composed/{way}/R@{k}"] for s in SPLITS for k in (1, 10)]
        cells += [100 * m[s]["retrieval/text_to_image/R@1"] for s in SPLITS]
        trains = (
            f"{source['adapted']['trainable_parameters']:,} parameters" if "adapted" in source else "nothing"
        )
        lines.append(f"| {shown} | {trains} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    m = saved["demo"]["metrics"]
    cells = [100 * m[s][f"chance/composed/sum/R@{k}"] for s in SPLITS for k in (1, 10)]
    lines.append("| chance | | " + " | ".join(f"{c:.2f}" for c in cells) + " | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--runs", type=Path, default=Path("runs/composed-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/composed-bench.json"))
    ap.add_argument("--report", action="store_true", help="reprint the table from --out")
    args = ap.parse_args()
    if args.report:
        print(table(json.loads(args.out.read_text())))
        return
    summary = build_composed()
    bench = default_out()
    saved: dict = {"benchmark": summary["splits"]}
    saved["demo"] = {"metrics": evaluate(args.checkpoint, bench, args.runs / "demo-eval.json")}
    saved["pic2word"] = arm("pic2word", args.checkpoint, bench / "train.jsonl", args.runs, bench)
    saved["rtd"] = arm("rtd", args.runs / "pic2word" / "checkpoint", bench / "train.jsonl", args.runs, bench)
    args.out.write_text(json.dumps(saved, indent=2))
    print(table(saved))


if __name__ == "__main__":
    main()
