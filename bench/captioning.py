"""Caption decoders on the demo recipe against the nearest training caption, on the emoji test-style
images (docs/captioning.md).

    make demo                                   # runs/demo/checkpoint: the CLIP-score judge
    python bench/captioning.py --seeds 0        # ~40 min a seed on 2 cores
    python bench/captioning.py --report         # reprint the table from the saved JSON

Group "coca" trains what docs/captioning.md's command trains — configs/demo.yaml under
configs/methods/coca.yaml: the demo's pretrained towers, a 2-layer caption decoder learning each image's
first caption "label (subcategory, category)" beside InfoNCE (λ = 2) — for --steps optimiser steps
(`train.max_minutes=0`: a busy machine changes the time, not the numbers), then captions --images
test-style images spread over the split (beam 3). The baseline "nearest" gives each of the same images
the English training caption whose embedding, by the coca checkpoint, is nearest its image embedding
(retrieval instead of generation; the test style's concepts are all in training, so the right label is
in the pool). "references" is each image's first English caption scored as a candidate: its CLIP-score
is the ceiling of the judge (BLEU/CIDEr against a set holding it would be trivially perfect, so "–").

Group "capdec" trains a base by the demo recipe alone (--base-steps), then on its locked towers two
text-only decoders (configs/methods/capdec.yaml, --text-steps each): noise σ measured from the base's
modality gap ("capdec-gap") and no noise ("capdec-none"), which caption the same images from their image
embeddings. The base is not the judge, so no row is judged by the towers it was trained on.

All are scored with BLEU-4 (add-one smoothed) and CIDEr-D against the image's English captions, and
CLIP-score by runs/demo/checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from recipes import fixed_steps, mean_std  # bench/recipes.py, beside this file

from lipkit.checkpoint import load_checkpoint
from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.data.image_store import ImageStore
from lipkit.data.records import spread_subset
from lipkit.data.sources.registry import read_table
from lipkit.eval.caption_eval import clip_score, references
from lipkit.eval.caption_metrics import bleu, cider_d
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

METRICS = ("captions/BLEU-4", "captions/CIDEr-D", "captions/CLIP-score")
ROWS = ("coca", "capdec-gap", "capdec-none", "nearest", "references")


def scored(captions: list[str], refs: list[list[str]], judge, records: list) -> dict[str, float]:
    return {
        "captions/BLEU-4": 100 * bleu(captions, refs, smooth=True),
        "captions/CIDEr-D": 100 * cider_d(captions, refs)[0],
        "captions/CLIP-score": 100 * clip_score(*judge, records, captions),
    }


@torch.no_grad()
def baselines(checkpoint: Path, judge, n_images: int) -> dict[str, dict[str, float]]:
    """The nearest English training caption of each captioned test image (by `checkpoint`), and the
    image's own first English caption, scored as the coca arm is."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    root = default_root()
    test = [r for r in read_table(root / "test-style.jsonl") if references(r, ["en"])]
    chosen = spread_subset(test, n_images)
    store = ImageStore(chosen, model.spec.image_size, cache=True, desc="test-style")
    pool = sorted({c for r in read_table(root / "train.jsonl") for c in references(r, ["en"])})
    img = embed_images(model.eval(), store, 64)
    txt = embed_texts(model, tokenizer, pool, 256)
    nearest = [pool[int(i)] for i in (img @ txt.t()).argmax(1)]
    refs = [references(r, ["en"]) for r in chosen]
    own = [r[0] for r in refs]
    return {
        "nearest": scored(nearest, refs, judge, chosen),
        "references": {"captions/CLIP-score": 100 * clip_score(*judge, chosen, own)},
    }


def train_and_caption(preset: str, out: Path, seed: int, steps: int, args, extra=()) -> tuple[dict, dict]:
    """Train configs/demo.yaml under configs/methods/`preset` for `steps` steps, then caption and score
    --images test-style images (lipkit eval); (metrics, the run's summary)."""
    root = default_root()
    sets = [*fixed_steps(out, seed, steps, args.batch, root / "train.jsonl"), *extra]  # evaluated once, below
    configs = [packaged_config()] + ([packaged_config().parent / "methods" / preset] if preset else [])
    cfg = load_config(configs, sets)
    t0 = time.perf_counter()
    run_dir, result = run_training(cfg)
    if not cfg.train.objective.startswith(("coca", "capdec")):
        return {}, {"steps": result.steps}
    splits = {"test-style": str(root / "test-style.jsonl")}
    ev = dataclasses.replace(
        cfg.eval,
        caption_max_images=args.images,
        caption_langs=["en"],
        caption_scorer=str(args.judge),
        class_columns=["subcategory"],
    )
    res = run_eval(
        run_dir / "checkpoint", splits, dataclasses.replace(cfg, eval=ev), run_dir / "eval" / "results.json"
    )
    split = res["splits"]["test-style"]
    summary = {"seed": seed, "steps": result.steps, "minutes": (time.perf_counter() - t0) / 60}
    return {m: split["metrics"][m] for m in METRICS}, {**summary, "examples": split.get("captions", [])[:4]}


def run_coca(seed: int, args: argparse.Namespace) -> list[dict]:
    """The coca row, and the nearest-caption and references rows by its checkpoint."""
    out = args.runs / f"coca-s{seed}"
    metrics, summary = train_and_caption("coca.yaml", out, seed, args.steps, args)
    judge_model, judge_tok, _ = load_checkpoint(args.judge)
    others = baselines(out / "checkpoint", (judge_model.eval(), judge_tok), args.images)
    rows = [{"row": "coca", **summary, "metrics": metrics}]
    return rows + [
        {"row": name, "seed": seed, "steps": summary["steps"], "metrics": found}
        for name, found in others.items()
    ]


def run_capdec(seed: int, args: argparse.Namespace) -> list[dict]:
    """The text-only decoder with noise from the gap and without noise, both on a base trained by the demo
    recipe for --base-steps (not the judge: the judge must not be the towers the decoder was trained on)."""
    base = args.runs / f"base-s{seed}"
    train_and_caption("", base, seed, args.base_steps, args)
    rows = []
    for name, noise in (("capdec-gap", "gap"), ("capdec-none", "0.0")):
        extra = [f"model.init_from={base / 'checkpoint'}", f"train.objective_args.noise_std={noise}"]
        metrics, summary = train_and_caption(
            "capdec.yaml", args.runs / f"{name}-s{seed}", seed, args.text_steps, args, extra
        )
        noise_std = float(
            load_checkpoint(args.runs / f"{name}-s{seed}" / "checkpoint")[0].captioner.noise_std
        )
        rows.append({"row": name, **summary, "noise_std": noise_std, "metrics": metrics})
    return rows


def table(runs: list[dict]) -> str:
    lines = ["| row | seeds | steps | BLEU-4 | CIDEr-D | CLIP-score |", "|---|---|---|---|---|---|"]
    for name in ROWS:
        rows = [r for r in runs if r["row"] == name]
        if rows:
            cells = [
                mean_std([r["metrics"][m] for r in rows]) if m in rows[0]["metrics"] else "–" for m in METRICS
            ]
            lines.append(f"| {name} | {len(rows)} | {rows[0]['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps of the coca run")
    ap.add_argument("--groups", default="coca,capdec", help="coca (+ nearest, references), capdec")
    ap.add_argument("--base-steps", type=int, default=60, help="steps of the text-only decoders' base")
    ap.add_argument("--text-steps", type=int, default=100, help="steps of each text-only decoder")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=500, help="test-style images captioned")
    ap.add_argument(
        "--judge", type=Path, default=Path("runs/demo/checkpoint"), help="the CLIP-score checkpoint"
    )
    ap.add_argument("--runs", type=Path, default=Path("runs/captioning-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/captioning-bench.md"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    saved = json.loads(raw.read_text()) if raw.is_file() else []
    if args.report:
        print(table(saved))
        return
    if not args.judge.is_dir():
        raise SystemExit(f"The CLIP-score judge {args.judge} does not exist: run `make demo` first.")
    build_emoji(default_root())
    for seed in (int(s) for s in args.seeds.split(",")):
        for group in args.groups.split(","):
            if any(r["seed"] == seed and r["row"].startswith(group) for r in saved):
                continue
            saved += {"coca": run_coca, "capdec": run_capdec}[group](seed, args)  # rows named group…
            raw.write_text(json.dumps(saved, indent=2, ensure_ascii=False))
            args.out.write_text(table(saved) + "\n")
            print(table(saved), flush=True)


if __name__ == "__main__":
    main()
