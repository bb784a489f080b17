"""Issue 29's attack measurements on the demo checkpoint: the universal perturbation against random noise, PGD
against SGA in transfer, and the word substitution — docs/attacks-bench.json, the tables of docs/robustness.md.

    make demo                                        # runs/demo/checkpoint
    lipkit train --config configs/demo.yaml --set train.seed=1 --set train.output=runs/demo-seed1
    lipkit train --config configs/demo-vit.yaml --set train.output=runs/demo-vit
    python bench/attacks.py                          # ~40 min on 2 cores
    python bench/attacks.py --report

- uap: one perturbation learned on train.jsonl (200 steps of 64) and applied to every test-style image,
  beside one random ±ε perturbation, at ε = 2/255 and 4/255 (zero-shot subcategory).
- transfer: PGD-10 and SGA crafted on runs/demo at ε = 2/255 on 256 test-style images (zero-shot), scored on
  each --targets checkpoint whose clean top-1 is at least 15 % (lower ones are listed and left out of the
  comparison), and on the OpenCLIP export of the first target, loaded by open_clip itself and fed the saved
  8-bit PNGs (clean and adversarial) — `lipkit checkpoint convert --to open_clip`.
- words: one word per caption (10 candidates) on the 256 images' captions (text→image R@1 within them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lipkit.attack.run import attack_split
from lipkit.data.emoji import default_root
from lipkit.data.label_sets import fill_template

ZS = "zeroshot/subcategory/top1"
T2I = "retrieval/text_to_image/R@1"


def _pct(x):
    return None if x is None else round(100 * x, 1)


def universal(args) -> list[dict]:
    rows = []
    for eps in args.uap_eps:
        start = time.perf_counter()
        r = attack_split(
            args.checkpoint,
            default_root() / "test-style.jsonl",
            args.runs / f"uap-{eps}-{args.uap_steps}",
            method="uap",
            train=str(default_root() / "train.jsonl"),
            eps=eps / 255,
            steps=args.uap_steps,
        )
        rows.append(
            {
                "eps (/255)": eps,
                "steps": args.uap_steps,
                "images": r["images"],
                "clean": _pct(r["clean"][ZS]),
                "uap": _pct(r["attacked"][ZS]),
                "random": _pct(r["random"][ZS]),
                "uap success": _pct(r["success_rate"]),
                "random success": _pct(r["random_success_rate"]),
                "minutes": round((time.perf_counter() - start) / 60, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def open_clip_scores(export: Path, tables: dict[str, Path], classes: list[str], templates: list[str]) -> dict:
    """Zero-shot top-1 of the OpenCLIP export on saved tables (open_clip's own model, tokenizer, transform)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    with torch.no_grad():
        prompts = tokenizer([fill_template(t, c) for c in classes for t in templates])
        text = torch.nn.functional.normalize(model.encode_text(prompts), dim=-1)
        text = torch.nn.functional.normalize(text.view(len(classes), len(templates), -1).mean(1), dim=-1)
        out = {}
        for name, table in tables.items():
            rows = [json.loads(line) for line in table.read_text().splitlines()]
            right = []
            for i in range(0, len(rows), 64):
                batch = torch.stack([preprocess(Image.open(r["image"])) for r in rows[i : i + 64]])
                best = (model.encode_image(batch) @ text.t()).argmax(1).tolist()
                right += [classes[b] == r["subcategory"] for b, r in zip(best, rows[i : i + 64], strict=True)]
            out[name] = right
    return out


def transfer(args) -> list[dict]:
    rows = []
    targets = [str(t) for t in args.targets]
    for method in ("pgd", "sga"):
        r = attack_split(
            args.checkpoint,
            default_root() / "test-style.jsonl",
            args.runs / f"transfer-{method}",
            method=method,
            eps=2 / 255,
            limit=args.limit,
            transfer=targets,
            save_images=True,
        )
        base = {"method": method, "images": r["images"]}
        rows.append(
            {
                **base,
                "target": "itself (white-box)",
                "clean": _pct(r["clean"][ZS]),
                "attacked": _pct(r["attacked"][ZS]),
                "success": _pct(r["success_rate"]),
            }
        )
        for t in r["transfer"]:
            rows.append(
                {
                    **base,
                    "target": t["checkpoint"],
                    "clean": _pct(t["clean"][ZS]),
                    "attacked": _pct(t["attacked"][ZS]),
                    "success": _pct(t["success_rate"]),
                    "counted": t["clean"][ZS] >= 0.15,
                }
            )
        if args.export:
            rows.append({**base, **_export_row(args, r, method)})
        for row in rows[-len(targets) - 2 :]:
            print(json.dumps(row), flush=True)
    return rows


def _export_row(args, r: dict, method: str) -> dict:
    """The first target's OpenCLIP export, fed the saved PNGs: clean (an ε = 0 run) and adversarial."""
    clean_run = args.runs / f"transfer-clean-{args.limit}"
    if not (clean_run / "adversarial.jsonl").exists():
        attack_split(
            args.checkpoint,
            default_root() / "test-style.jsonl",
            clean_run,
            eps=0.0,
            limit=args.limit,
            save_images=True,
        )
    s = r["settings"]
    # the attack's classes: a JSON table names no label set, so they are the values of the rows attacked
    classes = sorted(
        {json.loads(x)["subcategory"] for x in (clean_run / "adversarial.jsonl").read_text().splitlines()}
    )
    right = open_clip_scores(
        args.export,
        {
            "clean": clean_run / "adversarial.jsonl",
            "attacked": args.runs / f"transfer-{method}" / "adversarial.jsonl",
        },
        classes,
        s["templates"],
    )
    clean, attacked = right["clean"], right["attacked"]
    fooled = sum(c and not a for c, a in zip(clean, attacked, strict=True))
    return {
        "target": f"OpenCLIP export of {args.targets[0]}",
        "clean": _pct(sum(clean) / len(clean)),
        "attacked": _pct(sum(attacked) / len(attacked)),
        "success": _pct(fooled / max(sum(clean), 1)),
        "counted": sum(clean) / len(clean) >= 0.15,
    }


def words(args) -> list[dict]:
    r = attack_split(
        args.checkpoint,
        default_root() / "test-style.jsonl",
        args.runs / "words",
        method="words",
        task="retrieval",
        limit=args.limit,
    )
    row = {
        "images": r["images"],
        "captions": r["captions"],
        "changed": r["changed_captions"],
        "clean t2i R@1": _pct(r["clean"][T2I]),
        "attacked t2i R@1": _pct(r["attacked"][T2I]),
        "success": _pct(r["success_rate"]),
    }
    print(json.dumps(row), flush=True)
    return [row]


def export(args) -> None:
    if args.export and not (args.export / "open_clip_config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lipkit",
                "checkpoint",
                "convert",
                "--to",
                "open_clip",
                str(args.targets[0]),
                str(args.export),
            ],
            check=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument(
        "--targets",
        type=Path,
        nargs="*",
        default=[
            Path("runs/demo-seed1/checkpoint"),
            Path("runs/demo-vit/checkpoint"),
            Path("runs/methods/rs_m_clip-s0/checkpoint"),
        ],
    )
    ap.add_argument(
        "--export", default="runs/attack-bench/openclip-export", help='"" to leave the export out'
    )
    ap.add_argument("--runs", type=Path, default=Path("runs/attack-bench"))
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--uap-eps", type=int, nargs="*", default=[2, 4], help="uap: budgets in 1/255")
    ap.add_argument("--uap-steps", type=int, default=200, help="uap: training batches of 64")
    ap.add_argument(
        "--parts", nargs="*", default=["words", "transfer", "uap"], choices=["words", "transfer", "uap"]
    )
    ap.add_argument("--out", type=Path, default=Path("docs/attacks-bench.json"))
    ap.add_argument("--report", action="store_true", help="reprint the results from --out")
    args = ap.parse_args()
    args.export = Path(args.export) if args.export and args.targets else None
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.report:
        parts = {"words": words, "transfer": transfer, "uap": universal}
        for name in args.parts:
            if name == "transfer":
                export(args)
            rows = parts[name](args)
            if name == "uap":  # rows of other (ε, steps) kept
                keep = {(r["eps (/255)"], r.get("steps", 200)) for r in rows}
                old = [r for r in done.get("uap", []) if (r["eps (/255)"], r.get("steps", 200)) not in keep]
                rows = old + rows
            done[name] = rows
            args.out.write_text(json.dumps(done, indent=1))
    print(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
