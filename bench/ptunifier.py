"""PTUnifier on the demo checkpoint: is the fused [CLS] of an image alone a usable representation, and what
do the pseudo tokens add?

    make demo                          # runs/demo/checkpoint, the model adapted
    python bench/ptunifier.py          # adapts (300 steps), probes, re-ranks; docs/ptunifier-bench.json
    python bench/ptunifier.py --report # reprint the table from docs/ptunifier-bench.json

The checkpoint is adapted with `lipkit adapt --method ptunifier` on the training table (its defaults: 300
steps of 64 pairs, frozen towers, a fresh 2-layer matching head). Then a linear probe (eval.linear_probe:
standardised features, λ chosen on a held-out fifth) on the subcategory, fitted on K = 16 training images per
class (3 draws) or on the whole training table, is scored on test-style (the held-out artist), for four
image-only features:
  * pooled: the image tower's normalised embedding (what the dual encoder uses);
  * fused + pseudo caption: the adapted head's [CLS] with the image and k_t pseudo caption tokens (PTUnifier);
  * fused, no caption: the same head with the image tokens alone (the caption slot left empty);
  * fused + untrained pool: pseudo caption tokens from a fresh N(0, 0.02²) pool (the same head).
Paired input: `lipkit eval` on test-style with eval.rerank_top = 20, caption→image R@1 of the dual encoder
and after the adapted head re-ranks its top 20.
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
from lipkit.models.pseudo_tokens import PseudoTokenPools, fused_cls

FEATURES = ("pooled", "fused + pseudo caption", "fused, no caption", "fused + untrained pool")
SEEDS = (0, 1, 2)


@torch.no_grad()
def features(model, records, chunk: int = 128) -> dict[str, torch.Tensor]:
    """(N, ·) each image-only feature of FEATURES for every record (all must be readable)."""
    store = ImageStore(records, model.spec.image_size, cache=True, desc="images")
    assert not store.problems, "every image must be readable (the rows must stay aligned)"
    torch.manual_seed(0)  # the untrained pool
    fresh = PseudoTokenPools(model.spec.embed_dim, model.adapter.image_pool.shape[0], 1, model.adapter.text_k)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    for start in range(0, len(records), chunk):
        pixels = normalize(
            store.get(range(start, min(start + chunk, len(records)))),
            model.spec.image_mean,
            model.spec.image_std,
        )
        pooled, tokens = model.visual(pixels, return_tokens=True)
        tokens = F.normalize(tokens, dim=-1)
        empty = tokens.new_zeros(tokens.shape[0], 0, tokens.shape[-1])
        out["pooled"].append(F.normalize(pooled, dim=-1))
        out["fused + pseudo caption"].append(fused_cls(model, tokens))
        no_text = torch.zeros(tokens.shape[0], 0, dtype=torch.bool)
        out["fused, no caption"].append(model.matcher.fuse(tokens, empty, no_text)[:, 0])
        out["fused + untrained pool"].append(model.matcher.fuse(*fresh.complete(tokens, None, None))[:, 0])
    return {name: torch.cat(parts).float() for name, parts in out.items()}


def probe_top1(train: torch.Tensor, train_labels: list, test: torch.Tensor, test_labels: list) -> float:
    probe = fit_linear_probe(train, train_labels)
    scores, target, _ = probe.classify(test, test_labels)
    return 100 * (scores.argmax(1) == target).double().mean().item()


def probes(model, column: str = "subcategory") -> list[dict]:
    root = default_root()
    train, style = read_table(root / "train.jsonl"), read_table(root / "test-style.jsonl")
    test_feats, test_labels = features(model, style), [str(r.meta[column]) for r in style]
    rows = []
    draws = {f"K=16 seed {s}": few_shot(train, column, 16, s)[0] for s in SEEDS}
    draws["all rows"] = train
    for name, records in draws.items():
        feats, labels = features(model, records), [str(r.meta[column]) for r in records]
        row = {"probe": name, "images": len(records)}
        for kind in FEATURES:
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
        "dense R@1": round(100 * m["retrieval/text_to_image/R@1"], 2),
        "re-ranked R@1": round(100 * m["retrieval/reranked/text_to_image/R@1"], 2),
    }


def run(args) -> dict:
    root = default_root()
    adapted = args.runs / "adapted"
    start = time.perf_counter()
    info = adapt_checkpoint(
        args.checkpoint,
        root / "train.jsonl",
        "",
        adapted,
        overwrite=True,
        method="ptunifier",
        steps=args.steps,
    )
    minutes = round((time.perf_counter() - start) / 60, 1)
    model, _, _ = load_checkpoint(adapted / "checkpoint")
    model.eval()
    return {
        "adapt": {**info, "minutes": minutes},
        "probes": probes(model),
        "paired": rerank(adapted / "checkpoint", args.runs / "eval.json"),
    }


def table(result: dict) -> str:
    lines = ["| probe on test-style subcategory (top-1 %) | " + " | ".join(FEATURES) + " |"]
    lines.append("|" + "---|" * (len(FEATURES) + 1))
    few = [r for r in result["probes"] if r["probe"].startswith("K=16")]
    if few:
        cells = []
        for kind in FEATURES:
            values = [r[kind] for r in few]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}")
        lines.append(f"| K = 16 ({len(few)} draws) | " + " | ".join(cells) + " |")
    for r in result["probes"]:
        if not r["probe"].startswith("K=16"):
            lines.append(
                f"| {r['probe']} ({r['images']} images) | "
                + " | ".join(f"{r[k]:.1f}" for k in FEATURES)
                + " |"
            )
    p, a = result["paired"], result["adapt"]
    lines.append("")
    lines.append(
        f"caption→image R@1 on test-style: dense {p['dense R@1']:.1f}, re-ranked (top 20) {p['re-ranked R@1']:.1f}"
    )
    lines.append(
        f"adapt: {a['steps']} steps, {a['minutes']} min, first/last step {a['first_step']} / {a['last_step']}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--runs", type=Path, default=Path("runs/ptunifier-bench"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("docs/ptunifier-bench.json"))
    ap.add_argument("--report", action="store_true", help="reprint the table from --out")
    args = ap.parse_args()
    if not args.report:
        args.out.write_text(json.dumps(run(args), indent=1))
    print(table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
