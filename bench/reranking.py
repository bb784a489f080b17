"""Re-ranking the dense top 20 with an image–text matching head, on the emoji test-style split
(docs/reranking.md).

    make demo                                  # runs/demo/checkpoint: the dense model the "head" arm re-ranks
    python bench/reranking.py --seeds 0        # ~25 min a seed on 2 cores
    python bench/reranking.py --report         # reprint the table from the saved JSON

Arm "head": configs/methods/itm.yaml on runs/demo/checkpoint with both towers locked and the contrastive
weight 0 — a 2-layer fusion head learning the demo's training pairs against negatives drawn from each
batch by similarity (ALBEF) for --head-steps steps; the towers, so the dense ranking, are the demo's own. Arm
"head-mlm": the same with UNITER's masked language modelling through the head (mlm_weight 1). Arm "joint":
configs/demo.yaml under configs/methods/itm.yaml from the start (the head beside InfoNCE) for --steps
steps. Each is evaluated by `lipkit eval` on test-style (eval.rerank_top = 20): text→image R@1/R@5 of the
dense ranking and of the re-ranked one (both from the same checkpoint).

Cost per query (arm "head"): the test-style split embedded (`lipkit embed`) into a flat index and
--queries of its captions searched through `Searcher` as `lipkit search` does: the dense query (text tower
+ index) and the re-ranking (the 20 hits' images decoded, their tokens by the image tower, the head),
each timed over all queries after one warm-up, single-threaded as `lipkit serve` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from recipes import fixed_steps, mean_std  # bench/recipes.py, beside this file

from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.data.records import spread_subset
from lipkit.data.sources.registry import read_table
from lipkit.eval.suite import run_eval
from lipkit.search.embed import run_embed
from lipkit.search.index import build_index
from lipkit.search.query import Searcher
from lipkit.train.launch import run_training

METRICS = {
    "dense R@1": "retrieval/text_to_image/R@1",
    "re-ranked R@1": "retrieval/reranked/text_to_image/R@1",
    "dense R@5": "retrieval/text_to_image/R@5",
    "re-ranked R@5": "retrieval/reranked/text_to_image/R@5",
}


def train_and_eval(out: Path, seed: int, steps: int, args, extra=(), presets=("itm.yaml",)) -> dict:
    """Train configs/demo.yaml under the method presets for `steps` steps, then `lipkit eval` test-style."""
    root = default_root()
    sets = [*fixed_steps(out, seed, steps, args.batch, root / "train.jsonl"), *extra]
    methods = packaged_config().parent / "methods"
    cfg = load_config([packaged_config(), *(methods / p for p in presets)], sets)
    t0 = time.perf_counter()
    run_dir, result = run_training(cfg)
    ev = dataclasses.replace(cfg.eval, rerank_top=20, class_columns=["subcategory"], caption_max_images=0)
    res = run_eval(
        run_dir / "checkpoint",
        {"test-style": str(root / "test-style.jsonl")},
        dataclasses.replace(cfg, eval=ev),
        run_dir / "eval" / "results.json",
    )
    m = res["splits"]["test-style"]["metrics"]
    return {
        "seed": seed,
        "steps": result.steps,
        "minutes": (time.perf_counter() - t0) / 60,
        "metrics": {name: 100 * m[key] for name, key in METRICS.items()},
    }


def query_cost(checkpoint: Path, work: Path, n_queries: int) -> dict[str, float]:
    """Milliseconds per text query: dense (text tower + flat index) and the re-ranking of its top 20."""
    torch.set_num_threads(1)
    root = default_root()
    run_embed(checkpoint, root / "test-style.jsonl", work / "emb", progress=False)
    import numpy as np

    from lipkit.search.embeddings_dir import load_embeddings

    emb = load_embeddings(work / "emb")
    build_index(np.asarray(emb.image()), "flat", emb.items).save(work / "ix")
    s = Searcher(checkpoint, work / "ix", rerank=20)
    queries = [r.captions[0] for r in spread_subset(read_table(root / "test-style.jsonl"), n_queries)]
    s.rerank(queries[0], s.search(s.text_query(queries[0]), 20))  # warm-up
    dense = rerank = 0.0
    for q in queries:
        t0 = time.perf_counter()
        hits = s.search(s.text_query(q), 20)
        t1 = time.perf_counter()
        s.rerank(q, hits)
        dense, rerank = dense + t1 - t0, rerank + time.perf_counter() - t1
    torch.set_num_threads(2)
    return {"dense ms": 1000 * dense / len(queries), "re-rank ms": 1000 * rerank / len(queries)}


def run_head(seed: int, args, name: str = "head", more: tuple[str, ...] = ()) -> list[dict]:
    out = args.runs / f"{name}-s{seed}"
    extra = [
        f"model.init_from={args.base}",
        "train.lock_image=all",
        "train.lock_text=all",
        "train.objective_args.contrastive_weight=0",
        *more,
    ]
    row = {"row": name, **train_and_eval(out, seed, args.head_steps, args, extra)}
    row["cost"] = query_cost(out / "checkpoint", out / "search", args.queries)
    return [row]


def run_head_mlm(seed: int, args) -> list[dict]:
    """The "head" arm with UNITER's masked language modelling through the head beside matching."""
    return run_head(seed, args, "head-mlm", ("train.objective_args.mlm_weight=1",))


def run_joint(seed: int, args) -> list[dict]:
    return [{"row": "joint", **train_and_eval(args.runs / f"joint-s{seed}", seed, args.steps, args)}]


def table(runs: list[dict]) -> str:
    head = "| arm | seeds | steps | " + " | ".join(METRICS) + " | dense ms/query | + re-rank ms/query |"
    lines = [head, "|---" * (5 + len(METRICS)) + "|"]
    for name in ("head", "head-mlm", "joint"):
        rows = [r for r in runs if r["row"] == name]
        if not rows:
            continue
        cells = [mean_std([r["metrics"][m] for r in rows]) for m in METRICS]
        cost = [
            mean_std([r["cost"][c] for r in rows]) if "cost" in rows[0] else "–"
            for c in ("dense ms", "re-rank ms")
        ]
        lines.append(f"| {name} | {len(rows)} | {rows[0]['steps']} | " + " | ".join(cells + cost) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--groups", default="head,joint", help="of head, head-mlm, joint")
    ap.add_argument("--head-steps", type=int, default=200, help="steps of the head on the locked demo towers")
    ap.add_argument("--steps", type=int, default=150, help="steps of the joint run")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queries", type=int, default=100, help="text queries timed for the cost per query")
    ap.add_argument("--base", type=Path, default=Path("runs/demo/checkpoint"), help="the dense model")
    ap.add_argument("--runs", type=Path, default=Path("runs/reranking-bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/reranking-bench.md"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    raw = args.out.with_suffix(".json")
    saved = json.loads(raw.read_text()) if raw.is_file() else []
    if args.report:
        print(table(saved))
        return
    if not args.base.is_dir():
        raise SystemExit(f"The dense model {args.base} does not exist: run `make demo` first.")
    build_emoji(default_root())
    for seed in (int(s) for s in args.seeds.split(",")):
        for group in args.groups.split(","):
            if any(r["seed"] == seed and r["row"] == group for r in saved):
                continue
            saved += {"head": run_head, "head-mlm": run_head_mlm, "joint": run_joint}[group](seed, args)
            raw.write_text(json.dumps(saved, indent=2, ensure_ascii=False))
            args.out.write_text(table(saved) + "\n")
            print(table(saved), flush=True)


if __name__ == "__main__":
    main()
