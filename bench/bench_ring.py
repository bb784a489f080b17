"""Memory of SigLIP's ring (neighbour-exchange) local loss against the gathered global loss and against
OpenCLIP's `SigLipLoss` neighbour exchange, at W gloo ranks on the CPU.

    python bench/bench_ring.py                       # W = 2 and 4, local batch 64, 256, 1024, D = 64
    python bench/bench_ring.py --worlds 2 --batches 128,512 --dim 128

For each form, each rank runs the loss's forward + backward on random features while a dispatch mode
watches every tensor an op creates: the largest one (elements; for the logits a b × b block is b²) and
the peak of live tensor bytes created during the loss (the inputs excluded; each storage counted from
the op that made it until it is freed). Forms:

    ring       lipkit's train.local_loss for siglip (train.local_losses): recomputes each b × b block
    gathered   the features all-gathered (train.distributed.gather_inputs), then the whole (W·b)² loss
    oc-shift   OpenCLIP's SigLipLoss(dist_impl="shift"): the same ring, differentiated by autograd,
               which keeps every block's logits for the backward (W blocks)

The table gives the maximum over ranks, the ratio of each form's peak to the ring's, and milliseconds
per forward + backward (median of 3, outside the dispatch mode; the W processes share this machine's
cores, so compare rows of one run only). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ranks import free_port  # bench/ranks.py (this script's folder is on the path)

from lipkit.objectives import build_objective
from lipkit.train.distributed import Dist, gather_inputs
from lipkit.train.local_losses import local_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from live_tensors import LiveTensors  # noqa: E402 - the dispatch mode tests/test_local_losses.py uses

FORMS = ("ring", "gathered", "oc-shift")


def loss_fn(form: str, d: Dist, b: int):  # type: ignore[no-untyped-def]
    siglip = build_objective("siglip")
    if form == "ring":
        return lambda inputs: local_loss(siglip, inputs, d)
    if form == "gathered":
        return lambda inputs: siglip(**gather_inputs(inputs, d, b))
    from open_clip.loss import SigLipLoss

    oc = SigLipLoss(rank=d.rank, world_size=d.world, dist_impl="shift")
    return lambda inputs: oc(
        inputs["image_features"], inputs["text_features"], inputs["logit_scale"], inputs["logit_bias"]
    )


def fresh_inputs(b: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = (F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_() for _ in range(2))
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    return {"image_features": x, "text_features": y, "logit_scale": scale, "logit_bias": bias}


def measure(form: str, d: Dist, b: int, dim: int) -> tuple[list[float], float]:
    """[largest elements, peak live bytes, ms per forward + backward], the loss value (this rank)."""
    fn = loss_fn(form, d, b)
    inputs = fresh_inputs(b, dim, seed=d.rank)
    with LiveTensors() as mode:
        loss = fn(inputs)
        loss.backward()
        value = loss.item()
        del loss
    times = []
    for _ in range(3):
        inputs = fresh_inputs(b, dim, seed=d.rank)
        dist.barrier()
        start = time.perf_counter()
        fn(inputs).backward()
        times.append(1e3 * (time.perf_counter() - start))
    return [float(mode.largest), float(mode.peak), statistics.median(times)], value


def worker(rank: int, world: int, port: int, batches: list[int], dim: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    d = Dist(rank, world)
    try:
        for b in batches:
            rows, values = {}, {}
            for form in FORMS:
                numbers, value = measure(form, d, b, dim)
                stats = torch.tensor(numbers, dtype=torch.float64)
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                rows[form] = stats.tolist()
                if form != "gathered":  # a rank's share: their mean is the global loss
                    value = torch.tensor(value / world, dtype=torch.float64)
                    dist.all_reduce(value)
                values[form] = float(value)
            if rank == 0:
                report(world, b, rows, values)
    finally:
        # what the dispatch mode saw sits in reference cycles; freed after the group is gone, its
        # collectives' state aborts the process now and then (1 run in 10): free it first
        gc.collect()
        dist.destroy_process_group()


def report(world: int, b: int, rows: dict[str, list[float]], values: dict[str, float]) -> None:
    ring_peak = rows["ring"][1]
    agree = max(abs(v - values["ring"]) / abs(values["ring"]) for v in values.values())
    for form, (largest, peak, ms) in rows.items():
        print(
            f"{world:>5} {b:>7} {form:<9} {int(largest):>12} {largest / b**2:>7.2f} "
            f"{peak / 2**20:>10.2f} {peak / ring_peak:>8.2f} {ms:>9.1f}"
        )
    print(f"{'':>14}(the global loss of the forms agrees to {agree:.1e} relative)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="2,4", help="numbers of gloo ranks, comma-separated")
    parser.add_argument("--batches", default="64,256,1024", help="local batch sizes b, comma-separated")
    parser.add_argument("--dim", type=int, default=64, help="feature width D")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"SigLIP loss forward + backward per rank, D = {args.dim}; largest tensor in elements and in b²,")
    print(
        "peak of live tensor bytes created during the loss (MiB), its ratio to the ring's, ms (median of 3)"
    )
    print(
        f"{'world':>5} {'b':>7} {'form':<9} {'largest':>12} {'/b²':>7} {'peak MiB':>10} {'/ring':>8} {'ms':>9}"
    )
    for world in (int(w) for w in args.worlds.split(",")):
        mp.spawn(worker, args=(world, free_port(), batches, args.dim), nprocs=world, join=True)


if __name__ == "__main__":
    main()
