"""White-box PGD on the demo checkpoint: test-style zero-shot and retrieval under ε ∈ {1, 2, 4}/255.

    make demo                          # runs/demo/checkpoint
    python bench/robustness.py         # 256 test-style images, ℓ∞ PGD-10; docs/robustness-bench.json
    python bench/robustness.py --report

Each row runs `lipkit attack runs/demo/checkpoint test-style.jsonl --limit 256` (attack.run.attack_split):
`--task zeroshot` ascends the subcategory zero-shot loss and reports zero-shot top-1; `--task retrieval`
pushes each image away from its own captions and reports caption→image and image→caption R@1 (the
attacked images are the gallery, and the image queries). ε = 0 is the clean row (the same function, the
same images). The success rate is the share of the images right when clean that are wrong under attack.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lipkit.attack.run import attack_split
from lipkit.data.emoji import default_root

EPS = (0, 1, 2, 4)  # in 1/255
SHOWN = {
    "zeroshot": ("zeroshot/subcategory/top1",),
    "retrieval": ("retrieval/text_to_image/R@1", "retrieval/image_to_text/R@1"),
}


def run(args) -> list[dict]:
    rows = []
    source = default_root() / "test-style.jsonl"
    for task in ("zeroshot", "retrieval"):
        for eps in EPS:
            start = time.perf_counter()
            r = attack_split(
                args.checkpoint,
                source,
                args.runs / f"{task}-{eps}",
                task=task,
                eps=eps / 255,
                steps=args.steps,
                limit=args.limit,
            )
            row = {
                "task": task,
                "eps (/255)": eps,
                "images": r["images"],
                "success rate": round(100 * r["success_rate"], 1),
                "minutes": round((time.perf_counter() - start) / 60, 1),
                **{k: round(100 * r["attacked"][k], 1) for k in SHOWN[task]},
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for task, keys in SHOWN.items():
        lines += [f"| {task}: ε | " + " | ".join(keys) + " | success rate | minutes |"]
        lines += ["|" + "---|" * (len(keys) + 3)]
        for r in (r for r in rows if r["task"] == task):
            cells = [f"{r[k]:.1f}" for k in keys] + [f"{r['success rate']:.1f}", f"{r['minutes']}"]
            lines.append(f"| {r['eps (/255)']}/255 | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--runs", type=Path, default=Path("runs/robustness-bench"))
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("docs/robustness-bench.json"))
    ap.add_argument("--report", action="store_true", help="reprint the table from --out")
    args = ap.parse_args()
    if not args.report:
        args.out.write_text(json.dumps(run(args), indent=1))
    print(table(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
