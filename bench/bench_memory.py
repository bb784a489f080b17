"""Memory against speed for the big-batch options (activation checkpointing per tower, gradient caching)
and for torch.compile.

    python bench/bench_memory.py                                  # tiny preset, batch 256, bf16
    python bench/bench_memory.py --batch 512 --steps 4 --rows none,both,cache64

Each row runs `Trainer.step` (augmentation, tokenizer, autocast, clipping, fused AdamW: the real step)
on one synthetic batch in its own process, so its peak RSS is its own; the table gives peak RSS, the
growth of RSS during the steps (≈ activation and optimizer memory) and samples/s, with the ratio to the
`none` row. A benchmark, not a test: compare rows of one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {
    "none": {},
    "image": {"grad_checkpointing": "image"},
    "text": {"grad_checkpointing": "text"},
    "both": {"grad_checkpointing": "both"},
    "cache64": {"grad_cache_chunk": 64},
    "both+cache64": {"grad_checkpointing": "both", "grad_cache_chunk": 64},
    "compile": {"compile": True},  # train.compile: torch.compile of both towers (warm-up step compiles)
}
WORDS = [
    "red",
    "blue",
    "green",
    "heart",
    "face",
    "flag",
    "hand",
    "star",
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "smiling",
    "crying",
    "party",
]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(row: str, args: argparse.Namespace) -> dict:
    import torch

    from lipkit.config import AugmentConfig, TrainConfig
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec
    from lipkit.objectives import build_objective
    from lipkit.text.tokenizer import TextTokenizer
    from lipkit.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    captions = [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=g))
        for _ in range(args.batch)
    ]
    tok = TextTokenizer.train(captions, vocab_size=args.vocab, context_length=32)
    spec = get_spec(args.preset, vocab_size=tok.vocab_size, eot_id=tok.eot_id, pad_id=tok.pad_id)
    model = DualEncoder(spec)
    options = ROWS[row]
    cfg = TrainConfig(
        batch_size=args.batch, precision=args.precision, grad_cache_chunk=options.get("grad_cache_chunk", 0)
    )
    model.set_checkpointing(
        options.get("grad_checkpointing") in ("image", "both"),
        options.get("grad_checkpointing") in ("text", "both"),
    )
    if options.get("compile"):
        model.compile_towers()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model, build_objective("infonce"), tok, cfg, AugmentConfig(), Path(tmp), torch.device("cpu")
        )
        images = torch.randint(
            0, 256, (args.batch, 3, spec.image_size, spec.image_size), dtype=torch.uint8, generator=g
        )
        before = rss_mb()
        trainer.step(images, captions, 1e-4)  # warm-up (allocates optimizer state)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            trainer.step(images, captions, 1e-4)
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    return {
        "row": row,
        "peak_rss_mb": peak,
        "growth_mb": peak - before,
        "samples_per_s": args.batch / times[len(times) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = []
    for row in args.rows.split(","):
        cmd = [sys.executable, __file__, "--child", row, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        print(f"{row}: {results[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["row"] == "none"), results[0])
    print(f"\n{args.preset}, batch {args.batch}, {args.precision}, {args.threads} threads\n")
    print("| row | peak RSS MB | RSS growth in the steps MB | samples/s | × memory growth | × speed |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row']} | {r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | {r['samples_per_s']:.1f} | "
            f"{r['growth_mb'] / base['growth_mb']:.2f} | {r['samples_per_s'] / base['samples_per_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
