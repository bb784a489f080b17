"""Few-shot adaptation of the demo checkpoint, CoOp's base-to-novel protocol on test-style (docs/adapt.md).

    make demo                                   # runs/demo/checkpoint, the model adapted
    python bench/few_shot.py --shots 1,4,16 --seeds 0,1,2
    python bench/few_shot.py --report           # reprint the table from docs/few-shot-bench.json

The subcategories are split CoOp's way (the first half of the sorted names are "base", the rest "novel",
data.few_shot). For each K and seed, K shots of each base class are drawn from the training table and
each method adapts the checkpoint through `lipkit adapt`'s own function (adapt_checkpoint, which writes the
checkpoint); the adapted checkpoint is loaded back and test-style is scored as `lipkit eval` scores it
(eval.evaluate's class scoring, so CoOp's context, Tip-Adapter's cache and CLIP-Adapter's MLP act as they
do there): images of base classes among the base classes, images of novel classes among the novel classes,
zero-shot subcategory top-1 and their harmonic mean H. The image tower is the checkpoint's for every method
(none of them adapts it), so test-style's image features are computed once and each adapted model's image
adapter, if any, is applied to them. "zero-shot" is the checkpoint itself; "probe" a linear probe
(eval.linear_probe) fitted on the same shots' embeddings, base classes only (a probe cannot name a class it
never saw). "coop" starts from "a photo of a", "coop-random" from N(0, 0.02²) with M = 4 (CoOp's random
initialisation), "coop-csc" has one context per class. Steps and learning rates per method are METHODS
below, untuned. `--append` keeps the rows already in --out for other methods, K and seeds.

GRAM: the meta-training (`lipkit adapt --method gram-meta`, its defaults, from a random M = 4 context as
coop-random's) runs once on the training table's rows of *base* classes only, into --meta (kept; reused
when it exists), so novel classes are never seen before scoring. "gram-start" is that meta-learned context
untuned (K only picks the classes' shots it is not trained on), "gram-init" fine-tunes it as coop-random
is fine-tuned (AdamW, 50 steps, 2e-3: GRAM's initialisation against a random one), "gram" adapts as it
was meta-trained (one regulated step at α = 1), "gram-50" takes 50 such steps. The GRAM rows and their
comparators run on one checkpoint into their own file:

    python bench/few_shot.py --methods coop,coop-random,gram,gram-50,gram-init --out docs/gram-bench.json
    python bench/few_shot.py --methods gram-start --shots 1 --seeds 0 --out docs/gram-bench.json --append
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lipkit.adapt.run import AdaptSettings, adapt_checkpoint
from lipkit.checkpoint import load_checkpoint
from lipkit.data.emoji import default_root
from lipkit.data.few_shot import class_split, few_shot
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.data.transforms import normalize
from lipkit.eval.evaluate import _class_scores, _Images
from lipkit.eval.linear_probe import fit_linear_probe

COLUMN = "subcategory"
METHODS = {  # method → adapt settings beyond K and seed
    "tip": {},
    "tip-f": {"steps": 50, "lr": 1e-3},
    "clip-adapter": {"steps": 100, "lr": 1e-3},
    "coop": {"steps": 50, "lr": 2e-3},
    "coop-random": {"method": "coop", "steps": 50, "lr": 2e-3, "context_init": "", "context": 4},
    "coop-csc": {"method": "coop", "steps": 50, "lr": 2e-3, "class_specific": True},
    "lora": {"steps": 50, "lr": 1e-3},
    "gram": {},  # as meta-trained: its inner steps (1) at its α (1.0), regulated
    "gram-50": {"method": "gram", "steps": 50},
    "gram-init": {"method": "gram", "steps": 50, "lr": 2e-3, "regulate": False},
    "gram-start": {"method": "gram", "steps": 0, "regulate": False},
}


def meta_trained(args, train, base: list[str]) -> str:
    """--meta, meta-trained first on the base classes' training rows when it holds no gram.pt."""
    saved = Path(args.meta) / "gram.json"
    if saved.is_file() and json.loads(saved.read_text()).get("from") == str(Path(args.checkpoint).resolve()):
        return str(args.meta)  # meta-trained on this checkpoint already
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "base.jsonl"
        rows = [r for r in train if r.meta.get(COLUMN) in set(base)]
        root = default_root()
        with table.open("w") as f:
            for r in rows:  # the image paths made absolute: the table lives elsewhere
                f.write(json.dumps({"image": str(root / r.image), "captions": r.captions, **r.meta}) + "\n")
        info = adapt_checkpoint(
            args.checkpoint,
            table,
            None,
            args.meta,
            overwrite=True,
            method="gram-meta",
            context_init="",
            context=4,
        )
    print(json.dumps({k: v for k, v in info.items() if k != "data"}), flush=True)
    return str(args.meta)


def raw_features(model, records, batch: int = 128) -> torch.Tensor:
    """(N, D) the image tower's output for `records` (before any adapter and normalisation)."""
    store = ImageStore(records, model.spec.image_size, cache=True, desc="test-style")
    assert not store.problems, "every image must be readable (the rows must stay aligned)"
    out = []
    with torch.no_grad():
        for i in range(0, len(records), batch):
            pixels = store.get(range(i, min(i + batch, len(records))))
            out.append(model.visual(normalize(pixels, model.spec.image_mean, model.spec.image_std)).float())
    return torch.cat(out)


def top1(model, tok, raw: torch.Tensor, labels: list[str], classes: list[str], templates) -> float:
    """Zero-shot top-1 of these images among `classes`, through eval's scoring of the adapted column."""
    with torch.no_grad():
        feats = model.image_adapter(raw) if model.image_adapter is not None else raw
        images = _Images(F.normalize(feats, dim=-1), None, None)
        scores = _class_scores(model, tok, 256, images, classes, templates, COLUMN)
    index = {c: i for i, c in enumerate(classes)}
    target = torch.tensor([index[y] for y in labels])
    return (scores.argmax(1) == target).double().mean().item()


def harmonic(base: float, novel: float | None) -> float | None:
    return None if novel is None or base + novel == 0 else 2 * base * novel / (base + novel)


def run(args) -> list[dict]:
    root = default_root()
    train, test = read_table(root / "train.jsonl"), read_table(root / "test-style.jsonl")
    names = sorted({str(r.meta[COLUMN]) for r in train if r.meta.get(COLUMN)})
    base, novel = class_split(names, "base"), class_split(names, "novel")
    model, tok, _ = load_checkpoint(args.checkpoint)
    templates = AdaptSettings().templates
    split = {"base": [r for r in test if r.meta.get(COLUMN) in base]}
    split["novel"] = [r for r in test if r.meta.get(COLUMN) in novel]
    raw = {k: raw_features(model, v) for k, v in split.items()}
    labels = {k: [str(r.meta[COLUMN]) for r in v] for k, v in split.items()}
    classes = {"base": base, "novel": novel}

    def score(m) -> dict[str, float]:
        return {k: top1(m, tok, raw[k], labels[k], classes[k], templates) for k in split}

    rows = [{"method": "zero-shot", "shots": 0, "seed": 0, "trainable": 0, **score(model)}]
    print(json.dumps(rows[-1]), flush=True)
    meta = meta_trained(args, train, base) if any(m.startswith("gram") for m in args.methods) else ""
    for k in args.shots:
        for seed in args.seeds:
            shots, shot_labels = few_shot(train, COLUMN, k, seed, base)
            probe = fit_linear_probe(F.normalize(raw_features(model, shots), dim=-1), shot_labels)
            scores, target, _ = probe.classify(F.normalize(raw["base"], dim=-1), labels["base"])
            acc = (scores.argmax(1) == target).double().mean().item()
            trainable = probe.weight.numel() + probe.bias.numel()
            rows.append({"method": "probe", "shots": k, "seed": seed, "trainable": trainable, "base": acc})
            print(json.dumps(rows[-1]), flush=True)
            for method in args.methods:
                settings = {"method": method, "shots": k, "seed": seed, "split": "base", **METHODS[method]}
                if settings["method"] == "gram":
                    settings["meta"] = meta
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    info = adapt_checkpoint(args.checkpoint, root / "train.jsonl", COLUMN, out, **settings)
                    seconds = time.perf_counter() - start
                    adapted, _, _ = load_checkpoint(Path(out) / "checkpoint")
                    row = {
                        "method": method,
                        "shots": k,
                        "seed": seed,
                        "trainable": info["trainable_parameters"],
                    }
                    rows.append({**row, **score(adapted), "adapt_s": round(seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: mean ± std over seeds of base, novel and H, per method and K."""

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        mean = 100 * statistics.mean(values)
        return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    lines = [
        "| method | K | trainable parameters | seeds | base | novel | H |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, k), rs in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        b = [r["base"] for r in rs]
        n = [r["novel"] for r in rs if r.get("novel") is not None]
        h = [harmonic(r["base"], r.get("novel")) for r in rs]
        h = [x for x in h if x is not None]
        lines.append(
            f"| {method} | {k} | {rs[0]['trainable']:,} | {len(rs)} | {cell(b)} | {cell(n)} | {cell(h)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint")
    parser.add_argument("--shots", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","))
    parser.add_argument("--out", default="docs/few-shot-bench.json")
    parser.add_argument(
        "--meta", default="runs/gram-meta-base", help="GRAM's meta-training run (made if absent)"
    )
    parser.add_argument("--report", action="store_true", help="reprint the table from --out")
    parser.add_argument("--append", action="store_true", help="keep --out's rows of other methods, K, seeds")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report:
        rows = run(args)
        if args.append and out.is_file():
            new = {(r["method"], r["shots"], r["seed"]) for r in rows}
            rows = [
                r for r in json.loads(out.read_text()) if (r["method"], r["shots"], r["seed"]) not in new
            ] + rows
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
    print(table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
