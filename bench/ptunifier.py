"""PTUnifier on the demo checkpoint: is the fused [CLS] of an image alone a usable representation, and what
do the pseudo tokens add?

    make demo                          # runs/demo/checkpoint, the model adapted
    python bench/ptunifier.py          # adapts (300 steps), probes, re-ranks; docs/ptunifier-bench.json
    python bench/ptunifier.py --report # reprint the table from docs/ptunifier-bench.json

The checkpoint is adapted twice with `lipkit adapt --method ptunifier` on the training table (its defaults:
300 steps of 64 pairs, frozen towers, a fresh 2-layer matching head): with the pools trained (lipkit's
default) and with `--freeze-pools` (the reference code's pools, never trained). Then a linear probe
(eval.linear_probe: standardised features, λ chosen on a held-out fifth) on the subcategory, fitted on K = 16
training images per class (3 draws) or on the whole training table, is scored on test-style (the held-out
artist), for four image-only features:
  * pooled: the image tower's normalised embedding (what the dual encoder uses);
  * fused + pseudo caption: the adapted head's [CLS] with the image and k_t pseudo caption tokens (PTUnifier);
  * fused, no caption: the same head with the image tokens alone (the caption slot left empty);
  * frozen pools: fused + pseudo caption of the `--freeze-pools` run.
Cross-modal, on test-style: caption→image R@1 of the dual encoder (pooled embeddings), of the fused
features (caption alone against image alone, both through the head: one space for both kinds of input),
and, paired, after the adapted head re-ranks the dual encoder's top 20 (`lipkit eval`, eval.rerank_top 20).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lipkit.adapt.run import adapt_checkpoint
from lipkit.checkpoint import load_checkpoint
from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import default_root
from lipkit.data.few_shot import few_shot
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.data.transforms import normalize
from lipkit.eval.linear_probe import fit_linear_probe
from lipkit.eval.suite import run_eval
from lipkit.models.pseudo_tokens import encode_fused, fused_cls

FEATURES = ("pooled", "fused + pseudo caption", "fused, no caption", "frozen pools")
SEEDS = (0, 1, 2)


@torch.no_grad()
def features(models: dict, records, chunk: int = 128) -> dict[str, torch.Tensor]:
    """(N, ·) each image-only feature of FEATURES for every record (all must be readable); `models` the
    "trained" and "frozen" adaptations (the same towers)."""
    model, frozen = models["trained"], models.get("frozen")
    store = ImageStore(records, model.spec.image_size, cache=True, desc="images")
    assert not store.problems, "every image must be readable (the rows must stay aligned)"
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    mean, std = model.spec.image_mean, model.spec.image_std
    for start in range(0, len(records), chunk):
        pixels = normalize(store.get(range(start, min(start + chunk, len(records)))), mean, std)
        pooled, tokens = model.visual(pixels, return_tokens=True)
        tokens = F.normalize(tokens, dim=-1)
        empty = tokens.new_zeros(tokens.shape[0], 0, tokens.shape[-1])
        no_text = torch.zeros(tokens.shape[0], 0, dtype=torch.bool)
        out["pooled"].append(F.normalize(pooled, dim=-1))
        out["fused + pseudo caption"].append(fused_cls(model, tokens))
        out["fused, no caption"].append(model.matcher.fuse(tokens, empty, no_text)[:, 0])
        if frozen is not None:
            out["frozen pools"].append(fused_cls(frozen, tokens))
    return {name: torch.cat(parts).float() for name, parts in out.items() if parts}


@torch.no_grad()
def fused_retrieval(model, tokenizer, records, chunk: int = 128) -> dict[str, float]:
    """Caption→image R@1 (%) on `records` (each first caption's own image), pooled and fused."""
    store = ImageStore(records, model.spec.image_size, cache=True, desc="images")
    mean, std = model.spec.image_mean, model.spec.image_std
    image, text, fused_image, fused_text = [], [], [], []
    for start in range(0, len(records), chunk):
        part = range(start, min(start + chunk, len(records)))
        pixels = normalize(store.get(part), mean, std)
        ids = tokenizer([records[i].captions[0] for i in part])
        image.append(model.encode_image(pixels))
        text.append(model.encode_text(ids))
        fused_image.append(encode_fused(model, pixels))
        fused_text.append(encode_fused(model, ids=ids))
    keys = [r.image for r in records]

    def r1(queries, gallery) -> float:
        best = (torch.cat(queries) @ torch.cat(gallery).t()).argmax(1).tolist()
        return round(100 * sum(keys[j] == keys[i] for i, j in enumerate(best)) / len(keys), 2)

    return {"dense R@1": r1(text, image), "fused R@1": r1(fused_text, fused_image)}


def probe_top1(train: torch.Tensor, train_labels: list, test: torch.Tensor, test_labels: list) -> float:
    probe = fit_linear_probe(train, train_labels)
    scores, target, _ = probe.classify(test, test_labels)
    return 100 * (scores.argmax(1) == target).double().mean().item()


def probes(models: dict, column: str = "subcategory") -> list[dict]:
    root = default_root()
    train, style = read_table(root / "train.jsonl"), read_table(root / "test-style.jsonl")
    test_feats, test_labels = features(models, style), [str(r.meta[column]) for r in style]
    rows = []
    draws = {f"K=16 seed {s}": few_shot(train, column, 16, s)[0] for s in SEEDS}
    draws["all rows"] = train
    for name, records in draws.items():
        feats, labels = features(models, records), [str(r.meta[column]) for r in records]
        row = {"probe": name, "images": len(records)}
        for kind in (k for k in FEATURES if k in feats):
            row[kind] = round(probe_top1(feats[kind], labels, test_feats[kind], test_labels), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def rerank(checkpoint: Path, out: Path) -> dict:
    root = default_root()
    cfg = load_config(
        [packaged_config()], ["eval.class_columns=[subcategory]", "eval.linear_probe=", "eval.precision=fp32"]
    )
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, rerank_top=20, caption_max_images=0))
    m = run_eval(checkpoint, {"style": str(root / "test-style.jsonl")}, cfg, out)["splits"]["style"][
        "metrics"
    ]
    return {
        "eval dense R@1": round(100 * m["retrieval/text_to_image/R@1"], 2),
        "re-ranked R@1": round(100 * m["retrieval/reranked/text_to_image/R@1"], 2),
    }


def adapt(args, name: str, **extra) -> tuple[Path, dict]:
    """The adaptation OUT/name/checkpoint: made now, or (--reuse) the one already there with these steps."""
    out = args.runs / name
    saved = out / "checkpoint" / "config.json"
    if args.reuse and saved.is_file():
        info = json.loads(saved.read_text())["adapted"]
        if info["steps"] == args.steps and info["pools"] == ("frozen" if extra else "trained"):
            return out / "checkpoint", {**info, "minutes": None}
    start = time.perf_counter()
    info = adapt_checkpoint(
        args.checkpoint,
        default_root() / "train.jsonl",
        "",
        out,
        overwrite=True,
        method="ptunifier",
        steps=args.steps,
        **extra,
    )
    return out / "checkpoint", {**info, "minutes": round((time.perf_counter() - start) / 60, 1)}


def run(args) -> dict:
    trained, info = adapt(args, "adapted")
    runs = {"adapt": info}
    paths = {"trained": trained}
    if not args.skip_frozen:
        paths["frozen"], runs["adapt frozen pools"] = adapt(args, "frozen-pools", freeze_pools=True)
    models = {name: load_checkpoint(path)[0].eval() for name, path in paths.items()}
    _, tokenizer, _ = load_checkpoint(trained)
    style = read_table(default_root() / "test-style.jsonl")
    paired = fused_retrieval(models["trained"], tokenizer, style)
    if "frozen" in models:
        paired["fused R@1, frozen pools"] = fused_retrieval(models["frozen"], tokenizer, style)["fused R@1"]
    return {
        **runs,
        "probes": probes(models),
        "paired": {**paired, **rerank(trained, args.runs / "eval.json")},
    }


def table(result: dict) -> str:
    kinds = [k for k in FEATURES if k in result["probes"][0]]
    lines = ["| probe on test-style subcategory (top-1 %) | " + " | ".join(kinds) + " |"]
    lines.append("|" + "---|" * (len(kinds) + 1))
    few = [r for r in result["probes"] if r["probe"].startswith("K=16")]
    if few:
        cells = []
        for kind in kinds:
            values = [r[kind] for r in few]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}")
        lines.append(f"| K = 16 ({len(few)} draws) | " + " | ".join(cells) + " |")
    for r in result["probes"]:
        if not r["probe"].startswith("K=16"):
            cells = " | ".join(f"{r[k]:.1f}" for k in kinds)
            lines.append(f"| {r['probe']} ({r['images']} images) | {cells} |")
    p = result["paired"]
    frozen = p.get("fused R@1, frozen pools")
    lines.append("")
    lines.append(
        f"caption→image R@1 on test-style: dense {p['dense R@1']:.1f}, fused caption alone → image alone "
        f"{p['fused R@1']:.1f}"
        + (f" (frozen pools {frozen:.1f})" if frozen is not None else "")
        + f", dense re-ranked by the head (top 20) {p['re-ranked R@1']:.1f} (eval's dense {p['eval dense R@1']:.1f})"
    )
    for name in ("adapt", "adapt frozen pools"):
        if name in result:
            a = result[name]
            lines.append(
                f"{name}: {a['steps']} steps, {a['minutes']} min, first/last step {a['first_step']} / {a['last_step']}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--runs", type=Path, default=Path("runs/ptunifier-bench"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("docs/ptunifier-bench.json"))
    ap.add_argument("--reuse", action="store_true", help="keep adaptations already in --runs (same steps)")
    ap.add_argument("--skip-frozen", action="store_true", help="leave out the --freeze-pools adaptation")
    ap.add_argument("--report", action="store_true", help="reprint the table from --out")
    args = ap.parse_args()
    if not args.report:
        args.out.write_text(json.dumps(run(args), indent=1))
    print(table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
