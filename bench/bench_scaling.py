"""What each rank does per step under torchrun, before and after rank-sharded data and bucketed gradients.

    python bench/bench_scaling.py                       # tiny preset, global batch 64, 2 gloo ranks
    python bench/bench_scaling.py --batch 128 --steps 12

Two tables:
1. Per rank per step: images decoded (table, `data.cache_images=false`: every decode counted) and images
   augmented (counted in the trainer's `augment` calls), at 1 and 2 ranks — the real data source and
   trainer. "before" is what every rank did until now: read and decode the whole global batch (counted
   as one process reads it) and augment it all (the old step, rebuilt below).
2. Step time at 2 gloo ranks (a real `Trainer.step`: augmentation, tokenizer, forward, backward,
   gradient averaging, AdamW) in one run: "before" = the old step, rebuilt here — the global batch
   augmented on every rank and sliced, gradients averaged by the old `average_gradients` (one flattened
   all-reduce after the backward); "after" = this rank's share augmented and gradients averaged in
   25 MiB buckets started during the backward (train/reducer.py); "after, one all-reduce" = this rank's
   share augmented, `train.bucket_cap_mb=0` (one all-reduce after the backward), which separates the
   two changes. Ratios within one run on one machine; on
   2 cores, 2 ranks leave no spare core for communication to overlap with.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from PIL import Image
from ranks import free_port  # bench/ranks.py (this script's folder is on the path)

import lipkit.data.table_batches as table_batches
import lipkit.train.trainer as trainer_module
from lipkit.config import AugmentConfig, TrainConfig
from lipkit.data.sources.registry import read_table
from lipkit.data.table_batches import TrainBatches
from lipkit.data.transforms import normalize
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.distributed import Dist, average_gradients
from lipkit.train.trainer import Trainer

WORDS = ["red", "blue", "green", "heart", "face", "flag", "hand", "star", "cat", "dog", "sun", "moon"]


def write_table(root: Path, n: int) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (96, 96), ((37 * i) % 256, (91 * i) % 256, 120)).save(buf, format="PNG")
        (root / "img" / f"{i}.png").write_bytes(buf.getvalue())
        lines.append(
            json.dumps({"image": f"img/{i}.png", "captions": [f"{WORDS[i % 12]} {WORDS[i * 7 % 12]}"]})
        )
    (root / "t.jsonl").write_text("\n".join(lines) + "\n")
    return root / "t.jsonl"


def decode_counts(table: Path, batch: int, steps: int, size: int) -> dict[tuple[str, int], float]:
    """Images decoded per rank per step (rank 0's, a table with `data.cache_images=false`): "before" is
    what every rank did until now — read the whole global batch, as one process does."""
    records = read_table(table)
    decoded = []
    real = table_batches.decode_record

    def counting(record, size):
        decoded.append(1)
        return real(record, size)

    table_batches.decode_record = counting
    out = {}
    try:
        for layout, world in (("before", 1), ("after", 1), ("after", 2)):
            decoded.clear()
            b = TrainBatches(records, size, batch, seed=0, cache=False, rank=0, world=world)
            it = b.epoch(0)
            for _ in range(steps):
                next(it)
            out[layout, 2 if layout == "before" else world] = len(decoded) / steps
    finally:
        table_batches.decode_record = real
    return out


class FlatAverage:
    """The old gradient averaging: one flattened all-reduce after the backward."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params, self.early, self.buckets = params, 0, [params]

    def arm(self) -> None:
        pass

    def finish(self) -> None:
        average_gradients(self.params)


class GlobalAugmentTrainer(Trainer):
    """The old step: every rank augments the whole global batch, keeps its slice, and averages the
    gradients in one all-reduce after the backward."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.reducer = FlatAverage(self.params)

    def step(self, images_u8, captions, lr):  # type: ignore[override] - handed the global batch
        r, b = self.dist.rank, self.local_batch
        k = len(captions) // images_u8.shape[0]
        self._global = images_u8
        return Trainer.step(self, images_u8[r * b : (r + 1) * b], captions[r * b * k : (r + 1) * b * k], lr)

    def _augmented(self, images_u8: torch.Tensor) -> torch.Tensor:
        spec, a = self.model.spec, self.aug
        x = trainer_module.augment(
            self._global.float() / 255.0, self.gen, a.scale_min, a.rotate_deg, a.hflip, a.blur_p, a.colour
        )
        x = normalize(x * 255.0, spec.image_mean, spec.image_std)
        r, b = self.dist.rank, self.local_batch
        return x[r * b : (r + 1) * b].to(self.device)


# step-time rows: (the old step?, train.bucket_cap_mb)
VARIANTS = {"before": (True, 0.0), "after, one all-reduce": (False, 0.0), "after": (False, 25.0)}


def make_trainer(old: bool, rank: int, world: int, batch: int, size: int, cap: float = 25.0) -> Trainer:
    torch.manual_seed(0)
    tok = TextTokenizer.train(WORDS * 4, vocab_size=300, context_length=16)
    spec = get_spec("tiny", image_size=size, vocab_size=tok.vocab_size, eot_id=tok.eot_id, context_length=16)
    cfg = TrainConfig(batch_size=batch, threads=1, bucket_cap_mb=cap)
    cls = GlobalAugmentTrainer if old else Trainer
    return cls(
        DualEncoder(spec),
        build_objective("infonce"),
        tok,
        cfg,
        AugmentConfig(),
        Path(tempfile.mkdtemp()),
        torch.device("cpu"),
        dist=Dist(rank, world),
    )


def augmented_in_a_step(tr: Trainer, images: torch.Tensor, captions: list[str]) -> int:
    """Images the trainer's `augment` calls receive in one step."""
    seen, real = [], trainer_module.augment

    def counting(x, *a, **kw):
        seen.append(x.shape[0])
        return real(x, *a, **kw)

    trainer_module.augment = counting
    try:
        tr.step(images, captions, 1e-4)
    finally:
        trainer_module.augment = real
    return sum(seen)


def _timing_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    captions = [f"{WORDS[i % 12]} {WORDS[i * 5 % 12]}" for i in range(args.batch)]
    b = args.batch // world
    result = {}
    try:
        for _round in range(args.rounds):  # alternate, so that drift on the machine hits both alike
            for key, (old, cap) in VARIANTS.items():
                tr = make_trainer(old, rank, world, args.batch, args.size, cap)
                part = slice(0, args.batch) if old else slice(rank * b, (rank + 1) * b)  # old: global batch
                x, caps = images[part], captions[part]
                run = functools.partial(tr.step, x, caps, 1e-4)
                augmented = augmented_in_a_step(tr, x, caps)  # and warm-up: optimizer state, bucket rebuild
                torch.distributed.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    run()
                torch.distributed.barrier()
                result.setdefault(key, []).append((time.perf_counter() - t0) / args.steps)
                result[f"{key} augmented"] = augmented
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="image side")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = write_table(Path(tmp), args.batch * 4)
        decoded = decode_counts(table, args.batch, 3, args.size)
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g)
        one = augmented_in_a_step(
            make_trainer(False, 0, 1, args.batch, args.size), images, ["a b"] * args.batch
        )
        out = Path(tmp) / "timing.json"
        mp.spawn(_timing_worker, args=(2, free_port(), args, str(out)), nprocs=2, join=True)
        t = json.loads(out.read_text())
    print("| layout | ranks | decoded / rank / step | augmented / rank / step |")
    print("|---|---|---|---|")
    print(f"| this code | 1 | {decoded['after', 1]:.0f} | {one} |")
    print(f"| before | 2 | {decoded['before', 2]:.0f} | {t['before augmented']} |")
    print(f"| this code | 2 | {decoded['after', 2]:.0f} | {t['after augmented']} |")
    before = min(t["before"])
    print(
        f"\n2 gloo ranks, global batch {args.batch}, tiny preset at {args.size} px, best of {args.rounds} rounds"
    )
    for key in VARIANTS:
        best = min(t[key])
        print(f"| {key} | {best * 1e3:.0f} ms/step | {before / best:.2f}× the old step's speed |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
