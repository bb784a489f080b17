"""What curation buys in training: the demo recipe on the clean emoji table, on the noisy table, on the
noisy table filtered by CLIP score, and with the noise-robust objective (NEVLP), at an equal number of
steps and over several seeds; `reduce --ratio 0.5` against a random half and all data; a caption_mix row.

    python bench/curate_training.py --work runs/curate            # every part, 3 seeds (~2 h on 2 cores)
    python bench/curate_training.py --work runs/curate --parts score --steps 60 --seeds 0

Each run is `lipkit train -c configs/demo.yaml` with the label captions off (`data.meta_captions=[]`:
the noisy table has no label columns, they would reveal the noise), two captions per image, evaluation
on test-style only and no linear probe; `--steps` optimiser steps each (train.epochs set from the table's
steps per epoch). Parts (in order; later ones reuse earlier runs, every finished run is kept and reused):

  score   the scorers, which never saw the clean pairs: `noisy-s0` (the demo recipe on the noisy table) and
          `locked-s0` (both pretrained towers locked, only the projections trained on the noisy table, no
          augmentation); `lipkit data score` of the whole noisy table with each (AUC against truth.jsonl);
          `lipkit data filter --keep-fraction 0.7` with the better one: share of the mispaired rows removed
  noise   clean / noisy / filtered / nevlp × seeds: test-style zero-shot subcategory top-1 and t→i R@1;
          the noise's cost (clean − noisy) against 3 standard deviations, and how much of it filtering and
          NEVLP recover
  reduce  `lipkit data cluster` (k 64, clean-s0's checkpoint) of the clean table, `reduce --ratio 0.5`
          (nearest) and `--pick random` (a random half, drawn per cluster in proportion) × seeds
  mix     `data.caption_mix: {captions: 0.7, subcategory: 0.3}` on the clean table (seed 0): the label
          column drawn as the caption for 30 % of the samples

Results: WORK/results.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DATA = Path.home() / ".cache" / "lipkit" / "datasets"
METRICS = {"subcat": "zeroshot/subcategory/top1", "t2i": "retrieval/text_to_image/R@1"}
LIPKIT = [str(Path(sys.executable).parent / "lipkit")]  # the venv's command


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def sh(args: list[str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run([*LIPKIT, *args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): lipkit {' '.join(args)} — see {log}")


def train(work: Path, name: str, table: Path, seed: int, steps: int, *sets: str) -> dict[str, float]:
    """Train (or reuse) run `name` and return its final test-style metrics."""
    out = work / name
    metrics = out / "metrics.jsonl"
    settings = {"table": str(table), "seed": seed, "steps": steps, "sets": list(sets)}
    if not _finished(out, settings):
        shutil.rmtree(out, ignore_errors=True)
        rows = sum(1 for x in table.read_text(encoding="utf-8").splitlines() if x.strip())
        if rows < 256:
            sys.exit(f"{table} has {rows} rows, fewer than one batch of the demo recipe (256).")
        epochs = (steps + 0.5) / (rows // 256)  # the trainer runs int(epochs · (rows // 256)) steps
        print(f"  training {name} ({rows} rows, {steps} steps) ...", flush=True)
        sh(
            [
                "train",
                "-c",
                "configs/demo.yaml",
                "--set",
                f"data.train={table}",
                "--set",
                "data.meta_captions=[]",
                "--set",
                "data.captions_per_image=2",
                "--set",
                f"data.eval={{test-style: {DATA / 'emoji' / 'test-style.jsonl'}}}",
                "--set",
                "eval.linear_probe=",
                "--set",
                "train.max_minutes=0",
                "--set",
                f"train.epochs={epochs:.6f}",
                "--set",
                f"train.seed={seed}",
                "--set",
                f"train.output={out}",
                *[a for s in sets for a in ("--set", s)],
            ],
            work / f"{name}.log",
        )
        (out / "bench_settings.json").write_text(json.dumps(settings))
    final = [x for x in lines(metrics) if x.get("kind") == "eval" and x.get("split") == "test-style"][-1]
    return {k: round(100 * final["metrics"][m], 2) for k, m in METRICS.items()}


def _finished(out: Path, settings: dict) -> bool:
    """A run of these settings that ran to its end (a run of an older script without its settings file
    counts when its last step is the one asked for)."""
    metrics = out / "metrics.jsonl"
    if not (out / "checkpoint" / "model.safetensors").is_file() or not metrics.is_file():
        return False
    saved = out / "bench_settings.json"
    if saved.is_file():
        return json.loads(saved.read_text()) == settings
    steps = [x["step"] for x in lines(metrics) if x.get("kind") == "eval"]
    return bool(steps) and steps[-1] == settings["steps"]


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in METRICS:
        values = [r[k] for r in runs]
        out[k] = round(statistics.fmean(values), 2)
        out[f"{k}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
    return out


def part_score(work: Path, steps: int, noisy: Path, results: dict) -> Path:
    locked = ("train.lock_image=all", "augment.scale_min=1", "augment.rotate_deg=0")
    scorers = {"noisy-s0": (), "locked-s0": locked}
    aucs = {}
    for name, sets in scorers.items():
        results.setdefault("scorer_metrics", {})[name] = train(
            work, name, noisy / "train.jsonl", 0, steps, *sets
        )
        scored = work / f"score-{name}"
        print(f"  scoring the noisy table with {name} (finished chunks are reused) ...", flush=True)
        sh(
            [
                "data",
                "score",
                str(work / name / "checkpoint"),
                str(noisy / "train.jsonl"),
                str(scored),
                "--truth",
                str(noisy / "truth.jsonl"),
            ],
            work / f"score-{name}.log",
        )
        aucs[name] = json.loads((scored / "score.json").read_text())["truth"]["auc"]
    best = max(aucs, key=aucs.get)
    filtered = work / "filtered"
    if not (filtered / "filtered.jsonl").is_file():
        sh(
            ["data", "filter", str(work / f"score-{best}"), str(filtered), "--keep-fraction", "0.7"],
            work / "filter.log",
        )
    truth = {t["key"]: t["mispaired"] for t in lines(noisy / "truth.jsonl")}
    kept = {r["key"] for r in lines(filtered / "filtered.jsonl")}
    mispaired = [k for k, bad in truth.items() if bad]
    removed = sum(1 for k in mispaired if k not in kept)
    results["score"] = {
        "auc": aucs,
        "filter_scorer": best,
        "rows": len(truth),
        "kept": len(kept),
        "mispaired": len(mispaired),
        "mispaired_removed": removed,
        "mispaired_removed_rate": round(removed / len(mispaired), 4),
        "clean_removed": sum(1 for k, bad in truth.items() if not bad and k not in kept),
    }
    return filtered / "filtered.jsonl"


def part_noise(work: Path, steps: int, seeds: list[int], noisy: Path, filtered: Path, results: dict) -> None:
    nevlp = (
        "train.objective=nevlp",
        # one epoch of the noisy table (27 steps: all but the 181 rows of the dropped last batch) first
        "train.objective_args={multi_positive: true, warmup_steps: 27, refit_every: 5}",
    )
    conditions = {
        "clean": (DATA / "emoji" / "train.jsonl", ()),
        "noisy": (noisy / "train.jsonl", ()),
        "filtered": (filtered, ()),
        "nevlp": (noisy / "train.jsonl", nevlp),
    }
    rows = {}
    for cond, (table, sets) in conditions.items():
        runs = [train(work, f"{cond}-s{s}", table, s, steps, *sets) for s in seeds]
        rows[cond] = {"runs": runs, **summary(runs)}
    for k in METRICS:
        cost = rows["clean"][k] - rows["noisy"][k]
        stds = [rows[c][f"{k}_std"] for c in ("clean", "noisy")]
        significant = None if None in stds else bool(cost > 3 * max(stds))
        rows[f"{k}_noise_cost"] = round(cost, 2)
        rows[f"{k}_cost_over_3std"] = significant
        for fix in ("filtered", "nevlp"):  # the share of the cost won back, where there is a cost to win
            gain = rows[fix][k] - rows["noisy"][k]
            rows[f"{k}_{fix}_gain"] = round(gain, 2)
            rows[f"{k}_{fix}_recovered"] = round(gain / cost, 3) if significant else None
    results["noise"] = rows


def part_reduce(work: Path, steps: int, seeds: list[int], results: dict) -> None:
    clean = DATA / "emoji" / "train.jsonl"
    rows = {"all": {"runs": [train(work, f"clean-s{s}", clean, s, steps) for s in seeds]}}
    clusters = work / "clusters"  # with the clean-s0 model trained just above (or earlier)
    if not (clusters / "cluster.json").is_file():
        sh(
            ["data", "cluster", str(work / "clean-s0" / "checkpoint"), str(clean), str(clusters), "-k", "64"],
            work / "cluster.log",
        )
    for pick in ("nearest", "random"):
        runs = []
        for s in seeds:
            half = work / f"half-{pick}-s{s}"
            if not (half / "reduced.jsonl").is_file():
                sh(
                    [
                        "data",
                        "reduce",
                        str(clean),
                        str(clusters),
                        str(half),
                        "--ratio",
                        "0.5",
                        "--pick",
                        pick,
                        "--seed",
                        str(s),
                    ],
                    work / f"reduce-{pick}-s{s}.log",
                )
            runs.append(train(work, f"reduce-{pick}-s{s}", half / "reduced.jsonl", s, steps))
        rows[pick] = {"runs": runs}
    for row in rows.values():
        row.update(summary(row["runs"]))
    results["reduce"] = rows


def part_mix(work: Path, steps: int, results: dict) -> None:
    clean = DATA / "emoji" / "train.jsonl"
    mixed = train(work, "mix-s0", clean, 0, steps, "data.caption_mix={captions: 0.7, subcategory: 0.3}")
    results["mix"] = {"mix-s0": mixed, "clean-s0": train(work, "clean-s0", clean, 0, steps)}


def markdown(results: dict) -> str:
    """The tables of docs/curation.md: mean ± std over the seeds, test-style, in %."""

    def cell(row: dict, k: str) -> str:
        std = row.get(f"{k}_std")
        return f"{row[k]:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    out = []
    for part, names in (
        ("noise", ("clean", "noisy", "filtered", "nevlp")),
        ("reduce", ("all", "nearest", "random")),
    ):
        rows = results.get(part)
        if not rows:
            continue
        out += [f"| {part} | zero-shot subcategory top-1 | text→image R@1 |", "|---|---|---|"]
        out += [f"| {n} | {cell(rows[n], 'subcat')} | {cell(rows[n], 't2i')} |" for n in names if n in rows]
        out.append("")
    if "mix" in results:
        m = results["mix"]
        out += ["| seed 0 | subcategory | t→i R@1 |", "|---|---|---|"]
        out += [f"| {n} | {r['subcat']:.2f} | {r['t2i']:.2f} |" for n, r in m.items()]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/curate"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parts", default="score,noise,reduce,mix")
    ap.add_argument("--report", action="store_true", help="Only print the tables of WORK/results.json.")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads((args.work / "results.json").read_text())))
        return
    work, parts = args.work.resolve(), args.parts.split(",")
    work.mkdir(parents=True, exist_ok=True)
    noisy = DATA / "noisy"
    if not (noisy / "truth.jsonl").is_file():
        sh(["data", "build", "noisy"], work / "build-noisy.log")
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update(steps=args.steps, seeds=args.seeds)
    filtered = work / "filtered" / "filtered.jsonl"
    if "score" in parts:
        filtered = part_score(work, args.steps, noisy, results)
        results_path.write_text(json.dumps(results, indent=1))
    if "noise" in parts:
        if not filtered.is_file():
            sys.exit(f"{filtered} is missing: run the score part first (--parts score,noise).")
        part_noise(work, args.steps, args.seeds, noisy, filtered, results)
        results_path.write_text(json.dumps(results, indent=1))
    if "reduce" in parts:
        part_reduce(work, args.steps, args.seeds, results)
        results_path.write_text(json.dumps(results, indent=1))
    if "mix" in parts:
        part_mix(work, args.steps, results)
        results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
