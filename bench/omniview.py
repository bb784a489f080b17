"""Omniview invariance tuning on the demo checkpoint: do the drawing styles of one concept move together?

    make demo                                  # runs/demo/checkpoint, the model adapted
    python bench/omniview.py                   # trains λ = 0, 1, 4; evaluates; docs/omniview-bench.json
    python bench/omniview.py --weights 0,4 --ratio 0.5 --append   # the adapter blended at 50 %, not 20 %
    python bench/omniview.py --report          # reprint the table from docs/omniview-bench.json

Each row adapts the checkpoint with `lipkit adapt --method omniview --column concept` on the training table
(two artists' drawings of each concept are its views), 200 steps, the method's defaults otherwise; λ = 0 is
the caption term alone (CLIP-Adapter trained on the table's captions, no invariance term), the control that
separates the worst-view term's effect from merely training an adapter. Columns:
  * test-style (the held-out artist): zero-shot subcategory top-1 and caption→image R@1, as `lipkit eval`
    scores them (eval.suite.run_eval);
  * cross-style R@1: each test-style image queries the training artists' images, a hit when the nearest
    shows the same concept; on test-novel (concepts never trained on), each of its third artist's images
    queries the novel concepts' other two artists' images;
  * test-novel caption→image R@1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lipkit.adapt.run import adapt_checkpoint
from lipkit.checkpoint import load_checkpoint
from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import default_root
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.data.transforms import normalize
from lipkit.eval.suite import run_eval

WEIGHTS = (0.0, 1.0, 4.0)
HELD_OUT = "facebook"  # test-novel's artist that queries the other two


def raw_features(model, records, batch: int = 128) -> torch.Tensor:
    """(N, D) the image tower's output (before any adapter and normalisation)."""
    store = ImageStore(records, model.spec.image_size, cache=True, desc="images")
    assert not store.problems, "every image must be readable (the rows must stay aligned)"
    with torch.no_grad():
        return torch.cat(
            [
                model.visual(
                    normalize(
                        store.get(range(i, min(i + batch, len(records)))),
                        model.spec.image_mean,
                        model.spec.image_std,
                    )
                ).float()
                for i in range(0, len(records), batch)
            ]
        )


def cross_style(model, queries: torch.Tensor, gallery: torch.Tensor, q_keys: list, g_keys: list) -> float:
    """R@1 of image→image retrieval: the nearest gallery image shows the query's concept."""
    with torch.no_grad():
        if model.image_adapter is not None:
            queries, gallery = model.image_adapter(queries), model.image_adapter(gallery)
        nearest = (F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).t()).argmax(1)
    return sum(q_keys[i] == g_keys[j] for i, j in enumerate(nearest.tolist())) / len(q_keys)


def scores(checkpoint: Path, features: dict, out: Path) -> dict:
    root = default_root()
    cfg = load_config(
        [packaged_config()], ["eval.class_columns=[subcategory]", "eval.linear_probe=", "eval.precision=fp32"]
    )
    results = run_eval(
        checkpoint,
        {"style": str(root / "test-style.jsonl"), "novel": str(root / "test-novel.jsonl")},
        cfg,
        out,
    )
    style, novel = results["splits"]["style"]["metrics"], results["splits"]["novel"]["metrics"]
    model, _, _ = load_checkpoint(checkpoint)
    row = {
        "style subcategory top-1": style["zeroshot/subcategory/top1"],
        "style caption→image R@1": style["retrieval/text_to_image/R@1"],
        "novel caption→image R@1": novel["retrieval/text_to_image/R@1"],
    }
    for split, (queries, gallery, qk, gk) in features.items():
        row[f"{split} cross-style R@1"] = cross_style(model, queries, gallery, qk, gk)
    return row


def run(args) -> list[dict]:
    root = default_root()
    train, style, novel = (read_table(root / f"{n}.jsonl") for n in ("train", "test-style", "test-novel"))
    model, _, _ = load_checkpoint(args.checkpoint)
    raw = {
        name: raw_features(model, rows)
        for name, rows in (("train", train), ("style", style), ("novel", novel))
    }
    held = [i for i, r in enumerate(novel) if r.meta["style"] == HELD_OUT]
    rest = [i for i, r in enumerate(novel) if r.meta["style"] != HELD_OUT]
    concept = {
        name: [r.meta["concept"] for r in rows]
        for name, rows in (("train", train), ("style", style), ("novel", novel))
    }
    features = {
        "style": (raw["style"], raw["train"], concept["style"], concept["train"]),
        "novel": (
            raw["novel"][held],
            raw["novel"][rest],
            [concept["novel"][i] for i in held],
            [concept["novel"][i] for i in rest],
        ),
    }
    rows = [
        {
            "method": "zero-shot",
            "trainable": 0,
            **scores(args.checkpoint, features, args.runs / "zero-shot.json"),
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    for weight in args.weights:
        out = args.runs / f"omniview-{weight:g}-{args.ratio:g}"
        start = time.perf_counter()
        info = adapt_checkpoint(
            args.checkpoint,
            root / "train.jsonl",
            "concept",
            out,
            overwrite=True,
            method="omniview",
            view_weight=weight,
            ratio=args.ratio,
        )
        seconds = round(time.perf_counter() - start, 1)
        metrics = scores(out / "checkpoint", features, out / "eval.json")
        rows.append(
            {
                "method": f"omniview λ={weight:g}" + ("" if args.ratio == 0.2 else f", ratio {args.ratio:g}"),
                "trainable": info["trainable_parameters"],
                "adapt_s": seconds,
                **metrics,
                "adapted": info,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


COLUMNS = (
    "style subcategory top-1",
    "style caption→image R@1",
    "style cross-style R@1",
    "novel cross-style R@1",
    "novel caption→image R@1",
)


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable parameters | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in sorted(rows, key=lambda r: r["method"] != "zero-shot"):  # the checkpoint first
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | "
            + " | ".join(f"{100 * r[c]:.1f}" for c in COLUMNS)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--runs", type=Path, default=Path("runs/omniview-bench"))
    ap.add_argument(
        "--weights", default=",".join(map(str, WEIGHTS)), type=lambda s: [float(x) for x in s.split(",")]
    )
    ap.add_argument("--out", type=Path, default=Path("docs/omniview-bench.json"))
    ap.add_argument("--ratio", type=float, default=0.2, help="the adapter's residual ratio α")
    ap.add_argument("--append", action="store_true", help="keep --out's rows (the zero-shot row is redone)")
    ap.add_argument("--report", action="store_true", help="reprint the table from --out")
    args = ap.parse_args()
    if not args.report:
        rows = run(args)
        if args.append and args.out.is_file():
            new = {r["method"] for r in rows}
            rows = [r for r in json.loads(args.out.read_text()) if r["method"] not in new] + rows
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
