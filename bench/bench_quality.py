"""Quality at equal budget: lipkit's trainer against OpenCLIP's own training entry point.

    pip install -e ".[bench]"          # OpenCLIP + pandas (its CSV reader)
    python bench/bench_quality.py      # 4 epochs each, writes docs/quality-vs-openclip.md (+ .json)
    python bench/bench_quality.py --epochs 1 --out /tmp/q.md     # a quick look

Both train the same model shape (lipkit's `tiny` preset: ViT 64 px / patch 8, 192 wide × 6 layers, text
192 × 4 layers, embed 256) from scratch on the built-in emoji train split, with one fixed caption per
image ("label (subcategory, category)", the same text for both), the same batch, lr, weight decay,
warm-up, gradient clipping, bf16 autocast, seed and number of samples (epochs). Each library keeps its
own defaults otherwise: lipkit its BPE trained on the captions (8,192 tokens), its augmentation and
cosine schedule; OpenCLIP CLIP's BPE (49,408 tokens), its RandomResizedCrop and cosine schedule.

OpenCLIP reads the split exported as the CSV its `--dataset-type csv` expects and is run through
`open_clip_train.main.main` (its own script) with the model shape registered as an OpenCLIP model
config; its final checkpoint is converted with `lipkit.interop.open_clip.from_open_clip`. Both
checkpoints are then scored by the same lipkit evaluator (zero-shot with the same templates, retrieval
R@1 on test-style and test-novel). Each training runs in its own process: wall time, CPU time and peak
RSS (the process and its loader workers) are its own.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root

SCRATCH = packaged_config().parent / "scratch.yaml"
CAPTION = 2  # "label (subcategory, category)" in the emoji rows
SHOWN = [
    ("test-style", "zeroshot/subcategory/top1"),
    ("test-style", "zeroshot/category/top1"),
    ("test-style", "retrieval/text_to_image/R@1"),
    ("test-novel", "zeroshot/subcategory/top1"),
    ("test-novel", "retrieval/text_to_image/R@1"),
    ("test-novel", "retrieval/image_to_text/R@1"),
]


def usage() -> dict[str, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "peak_rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024,
    }


def lipkit_config(args: argparse.Namespace, out: Path):
    root = default_root()
    return load_config(
        [SCRATCH],
        [
            f"data.train={root / 'train.jsonl'}",
            "data.eval={"
            + ", ".join(f"'{s}': '{root / s}.jsonl'" for s in ("test-style", "test-novel"))
            + "}",
            f"data.caption_select=[{CAPTION}]",
            "data.caption_policy=first",
            f"train.output={out}",
            f"train.epochs={args.epochs}",
            "train.max_minutes=0",
            "train.eval_every=0",
            f"train.seed={args.seed}",
            f"train.batch_size={args.batch}",
        ],
    )


def child_lipkit(args: argparse.Namespace) -> dict:
    from lipkit.train.launch import run_training

    t0 = time.perf_counter()
    run_dir, result = run_training(lipkit_config(args, args.work / "lipkit"))
    return {
        "checkpoint": str(run_dir / "checkpoint"),
        "samples": result.samples,
        "wall_s": time.perf_counter() - t0,
        **usage(),
    }


def export_csv(dest: Path) -> int:
    """The train split as OpenCLIP's CSV: absolute image path, one caption."""
    root = default_root()
    rows = [
        json.loads(line) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]
    with dest.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        for r in rows:
            w.writerow([str(root / r["image"]), r["captions"][CAPTION]])
    return len(rows)


def open_clip_shape(cfg) -> dict:
    """The lipkit run's model preset as an OpenCLIP model config, with CLIP's BPE vocabulary."""
    from lipkit.interop.clip_bpe import CLIP_VOCAB_SIZE
    from lipkit.interop.open_clip import open_clip_model_config
    from lipkit.models.presets import get_spec

    spec = get_spec(
        cfg.model.preset,
        vocab_size=CLIP_VOCAB_SIZE,
        eot_id=CLIP_VOCAB_SIZE - 1,
        context_length=cfg.tokenizer.context_length,
    )
    return open_clip_model_config(spec)


def child_open_clip(args: argparse.Namespace) -> dict:
    import open_clip
    from open_clip_train.main import main as open_clip_main

    work = args.work / "open_clip"
    cfg = lipkit_config(args, work)
    t = cfg.train
    configs = work / "model_configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "lipkit-tiny.json").write_text(json.dumps(open_clip_shape(cfg)), encoding="utf-8")
    open_clip.add_model_config(configs)
    n = export_csv(work / "train.csv")
    argv = [
        "--train-data", str(work / "train.csv"), "--dataset-type", "csv", "--csv-separator", ",",
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--train-num-samples", str(n),
        "--model", "lipkit-tiny", "--batch-size", str(args.batch), "--epochs", str(args.epochs),
        "--lr", str(t.lr), "--wd", str(t.weight_decay), "--warmup", str(t.warmup_steps),
        "--grad-clip-norm", str(t.grad_clip), "--precision", "amp_bf16" if t.precision == "bf16" else "fp32",
        "--workers", "1", "--seed", str(args.seed), "--device", "cpu", "--logs", str(work / "logs"),
        "--name", "run", "--save-frequency", str(args.epochs), "--log-every-n-steps", "5", "--report-to", "",
    ]  # fmt: skip
    t0 = time.perf_counter()
    open_clip_main(argv)
    wall = time.perf_counter() - t0
    ckpt = work / "logs" / "run" / "checkpoints" / f"epoch_{args.epochs}.pt"
    steps = (n // args.batch) * args.epochs  # its CSV loader drops the last partial batch
    return {
        "checkpoint": str(ckpt),
        "config": str(configs / "lipkit-tiny.json"),
        "samples": steps * args.batch,
        "wall_s": wall,
        **usage(),
    }


def evaluate(args: argparse.Namespace, name: str, info: dict) -> dict:
    from lipkit.checkpoint import save_checkpoint
    from lipkit.eval.suite import run_eval

    cfg = lipkit_config(args, args.work / name)
    checkpoint = Path(info["checkpoint"])
    if name == "open_clip":  # convert OpenCLIP's checkpoint to a lipkit one first
        from lipkit.interop.open_clip import from_open_clip

        model, tok = from_open_clip(info["config"], checkpoint)
        checkpoint = save_checkpoint(
            args.work / "open_clip" / "converted", model, tok, {"source": "open_clip"}
        )
    results = run_eval(checkpoint, cfg.data.eval, cfg, args.work / name / "eval.json")
    return {
        "metrics": {f"{s}/{m}": results["splits"][s]["metrics"][m] for s, m in SHOWN},
        "chance": {f"{s}/{m}": results["splits"][s]["chance"][m] for s, m in SHOWN},
    }


def table(rows: dict, epochs: float) -> str:
    heads = [
        "style subcat top1",
        "style category top1",
        "style t→i R@1",
        "novel subcat top1",
        "novel t→i R@1",
        "novel i→t R@1",
    ]
    lines = [
        f"| trainer ({epochs:g} epochs) | "
        + " | ".join(heads)
        + " | samples | samples/s | wall min | CPU-min | peak RSS MB |",
        "|---|" + "---|" * (len(heads) + 5),
    ]
    for name, r in rows.items():
        vals = " | ".join(f"{100 * r['metrics'][f'{s}/{m}']:.1f}" for s, m in SHOWN)
        lines.append(
            f"| {name} | {vals} | {r['samples']} | {r['samples'] / r['wall_s']:.0f} | {r['wall_s'] / 60:.1f} | "
            f"{r['cpu_s'] / 60:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    any_row = next(iter(rows.values()))
    lines.append(
        "| chance | "
        + " | ".join(f"{100 * any_row['chance'][f'{s}/{m}']:.1f}" for s, m in SHOWN)
        + " | | | | | |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where runs go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("docs/quality-vs-openclip.md"))
    ap.add_argument("--child", choices=["lipkit", "open_clip"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = child_lipkit if args.child == "lipkit" else child_open_clip
        (args.work / f"{args.child}.json").write_text(json.dumps(fn(args)))
        return
    try:
        import open_clip_train.main  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"bench_quality runs OpenCLIP's own trainer: pip install -e '.[bench]' ({e})."
        ) from e
    build_emoji(default_root())
    with tempfile.TemporaryDirectory(prefix="lipkit-quality-") as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        rows = {}
        for name in ("lipkit", "open_clip"):
            cmd = [sys.executable, __file__, "--child", name, "--work", str(args.work),
                   "--epochs", str(args.epochs), "--batch", str(args.batch), "--seed", str(args.seed)]  # fmt: skip
            subprocess.run(cmd, check=True)
            info = json.loads((args.work / f"{name}.json").read_text())
            rows[name] = {**info, **evaluate(args, name, info)}
            print(table(rows, args.epochs), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    args.out.write_text(table(rows, args.epochs) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
