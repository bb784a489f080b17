"""lipkit vs OpenCLIP: training and inference speed of the same model on the same data (not a test).

    python bench/bench_train.py                                   # tiny preset, batch 128, 20 steps
    python bench/bench_train.py --preset tiny --batch 128 --steps 20 --threads 2 --precision fp32,bf16
    python bench/bench_train.py --steps 2 --reps 2 --batch 32     # a quick smoke run
    python bench/bench_train.py --json runs/bench_train.json      # also write every number as JSON

What it does:
1. A `check` subprocess builds the lipkit model of the preset and the OpenCLIP model of the
   equivalent config (`lipkit.interop.open_clip.open_clip_model_config` →
   `open_clip.create_model`, random init, nothing downloaded), checks that both have the same
   parameter count, and loads lipkit's weights into OpenCLIP to show both compute the same function.
2. One long-lived worker subprocess per (library, precision) — the script re-invoked with
   `--worker lipkit|open_clip` — so each library's peak RSS is its own. Each builds its model,
   optimizer and the same synthetic batch (random uint8 images at the preset size, normalised;
   random token ids of the model's vocabulary, 4–23 tokens between start and end token, padded),
   and runs `--warmup` untimed steps. A short-lived twin of each (`--flops`) counts the FLOPs of one
   training forward+backward (`torch.utils.flop_counter.FlopCounterMode`) and of one image-tower
   inference, in a process of its own: the counter imports ~160 MB (torch._dynamo and more) that
   would otherwise sit in the measured worker's peak RSS.
   * lipkit: `Trainer.step` without augmentation and tokenization — `param_groups` + the Trainer's
     AdamW (`lipkit.train.adamw`: torch's fused kernel without `torch.optim` on a CPU; betas
     0.9/0.98, eps 1e-6), `objective_inputs` under `torch.autocast`, `InfoNCE`, backward,
     `clip_grad_norm_`, the finite check, `opt.step()`, logit-scale clamp.
   * OpenCLIP: `open_clip_train.train.train_one_epoch`'s step — `get_autocast`, `model(images,
     texts)` with `output_dict=True`, `ClipLoss`, backward, `clip_grad_norm_` (the script's
     `--grad-clip-norm 1.0`, matching lipkit's default), AdamW with `main.py`'s gain/bias groups,
     logit-scale clamp.
   * inference: image tower, `model.eval()`, `torch.no_grad()`, same autocast.
3. A `peak` worker times large fp32 and bf16 `torch.matmul`s at the same thread count.
4. The parent interleaves everything: each of `--reps` rounds trains every worker for
   `steps/reps` steps (library order alternating between rounds), then runs inference, then
   the matmul peak. It reports the median over rounds and the spread (min–max), and the
   lipkit/OpenCLIP ratio as the median of the per-round ratios (pairs measured seconds apart).
   Peak RSS (`ru_maxrss`) is read after the rounds: warm-up, timed training and inference.
5. Finally it profiles a few training steps of each worker (`torch.profiler`, top ops by self CPU
   time; only lipkit's table is printed unless `--profile-peer`); the profiler's records raise each
   worker's peak RSS by ~100 MB, so the peak including them is only printed alongside.

On a machine other jobs share, OpenMP's default spin-waiting makes every parallel op wait for a
descheduled thread: `--omp-wait-policy passive` (or 1 thread) measures the libraries, not the
scheduler. See docs/benchmarks.md for numbers and how to read them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("lipkit", "open_clip")
OC_NAME = "lipkit-bench"  # the name the equivalent OpenCLIP config is registered under
SOT_ID, EOT_ID, PAD_ID = 1, 2, 0  # lipkit's tokenizer specials (pad, start, end = 0, 1, 2)
MIN_TOKENS, MAX_TOKENS = 4, 23  # caption length between start and end token (short captions)


# ------------------------------------------------------------------------------------------------
# helpers shared by the workers
# ------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synthetic(spec: dict[str, Any], batch: int, seed: int):
    """The same images and token ids in every process (seeded CPU generator)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size, ctx, vocab = spec["image_size"], spec["context_length"], spec["vocab_size"]
    u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    mean = torch.tensor(spec["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["image_std"]).view(1, 3, 1, 1)
    images = (u8.float() / 255.0 - mean) / std
    hi = min(MAX_TOKENS, ctx - 2)
    lengths = torch.randint(min(MIN_TOKENS, hi), hi + 1, (batch,), generator=g)
    body = torch.randint(3, vocab, (batch, ctx), generator=g)
    ids = torch.full((batch, ctx), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = SOT_ID, body[i, :n], EOT_ID
    checksum = float(images.double().sum()) + float(ids.sum())
    return images, ids, checksum, float(lengths.float().mean()) + 2


def sdpa_cpu_flops() -> dict:
    """FlopCounterMode knows the CUDA SDPA kernels; count the CPU flash-attention ones the same way."""
    import torch
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *_, out_shape=None, **__) -> int:
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *_, out_shape=None, **__) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def count_flops(fn) -> tuple[int, dict[str, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flops()) as counter:
        fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def autocast_ctx(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------------------------------------
# the two libraries' training steps
# ------------------------------------------------------------------------------------------------
class LipkitRunner:
    """lipkit's Trainer.step (lipkit/train/trainer.py) on ready tensors: no augmentation, no tokenizer."""

    def __init__(self, spec_dict: dict[str, Any], args: argparse.Namespace) -> None:
        import torch

        from lipkit.malloc import keep_freed_memory
        from lipkit.models.dual_encoder import DualEncoder
        from lipkit.models.presets import ModelSpec
        from lipkit.objectives.infonce import InfoNCE
        from lipkit.train.adamw import adamw
        from lipkit.train.inputs import objective_inputs
        from lipkit.train.optim import param_groups
        from lipkit.train.views import Views

        self.torch, self.objective_inputs, self.no_views = torch, objective_inputs, Views()
        self.malloc_tuned = keep_freed_memory()  # as the Trainer does on a CPU (lipkit/malloc.py)
        self.precision, self.lr, self.clip = args.precision, args.lr, 1.0
        self.model = DualEncoder(ModelSpec.from_dict(spec_dict)).train()
        self.objective = InfoNCE()
        self.needs = set(InfoNCE.inputs)
        groups = param_groups(self.model, args.weight_decay)
        # as the Trainer: fused AdamW without torch.optim on a CPU (lipkit/train/adamw.py)
        self.opt = adamw(groups, args.lr, torch.device("cpu"), betas=(0.9, 0.98), eps=1e-6)
        self.params = [p for g in groups for p in g["params"]]
        self.max_log_scale = math.log(100.0)

    def num_params(self) -> int:
        return self.model.num_params()

    def forward_loss(self, images, ids):
        torch = self.torch
        with torch.profiler.record_function("bench:forward"), autocast_ctx(self.precision):
            out = self.objective_inputs(self.model, self.needs, images, ids, 1, self.no_views, PAD_ID)
        with torch.profiler.record_function("bench:loss"):
            out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
            return self.objective(**out)

    def step(self, images, ids) -> float:
        torch = self.torch
        for group in self.opt.param_groups:
            group["lr"] = self.lr * group["lr_scale"]
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_loss(images, ids)
        with torch.profiler.record_function("bench:backward"):
            loss.backward()
        with torch.profiler.record_function("bench:clip"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            if not bool(finite):
                self.opt.zero_grad(set_to_none=True)
                return float(loss)
        with torch.profiler.record_function("bench:optimizer"):
            self.opt.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, self.max_log_scale)
        return float(loss.detach())

    def encode_image(self, images):
        with autocast_ctx(self.precision):
            return self.model.encode_image(images)

    def extra(self, args: argparse.Namespace) -> dict[str, Any]:
        """What Trainer.step adds on top: on-batch augmentation (normalize + one grid_sample)."""
        torch = self.torch
        from lipkit.data.transforms import augment, normalize

        spec = self.model.spec
        g = torch.Generator().manual_seed(0)
        u8 = torch.randint(0, 256, (args.batch, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
        times = []
        for i in range(4):
            t = time.perf_counter()
            augment(normalize(u8, spec.image_mean, spec.image_std), g, 0.6, 10.0, False)
            if i:
                times.append(time.perf_counter() - t)
        return {"augment_ms_per_batch": 1000 * statistics.median(times)}


class OpenClipRunner:
    """The step of open_clip_train.train.train_one_epoch (accum_freq 1, no distillation, no scaler)."""

    def __init__(self, oc_cfg: dict[str, Any], args: argparse.Namespace) -> None:
        import open_clip
        import torch
        from open_clip_train.precision import get_autocast

        self.torch = torch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{OC_NAME}.json"
            path.write_text(json.dumps(oc_cfg), encoding="utf-8")
            open_clip.add_model_config(path)
        oc_precision = "amp_bf16" if args.precision == "bf16" else "fp32"
        self.model = open_clip.create_model(
            OC_NAME, pretrained=None, precision=oc_precision, device="cpu", output_dict=True
        ).train()
        self.autocast = get_autocast(oc_precision, device_type="cpu")
        self.loss = open_clip.ClipLoss(cache_labels=True, rank=0, world_size=1)
        # open_clip_train/main.py: no weight decay on gains, biases and the logit scale
        named = list(self.model.named_parameters())

        def exclude(n, p):
            return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

        gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
        rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
        self.opt = torch.optim.AdamW(
            [
                {"params": gain_or_bias, "weight_decay": 0.0},
                {"params": rest, "weight_decay": args.weight_decay},
            ],
            lr=args.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        self.lr, self.grad_clip_norm = args.lr, 1.0

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def forward_loss(self, images, ids):
        torch = self.torch
        with torch.profiler.record_function("bench:forward"), self.autocast():
            model_out = self.model(images, ids)
        with torch.profiler.record_function("bench:loss"), self.autocast():
            losses = self.loss(**model_out, output_dict=True)
            return sum(losses.values())

    def step(self, images, ids) -> float:
        torch = self.torch
        for group in self.opt.param_groups:  # the script's scheduler(step) assigns the lr
            group["lr"] = self.lr
        self.opt.zero_grad()
        total_loss = self.forward_loss(images, ids)
        with torch.profiler.record_function("bench:backward"):
            total_loss.backward()
        with torch.profiler.record_function("bench:clip"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm, norm_type=2.0)
        with torch.profiler.record_function("bench:optimizer"):
            self.opt.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))
        return float(total_loss.detach())

    def encode_image(self, images):
        with self.autocast():
            return self.model.encode_image(images, normalize=True)

    def extra(self, args: argparse.Namespace) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------------------
# workers (subprocesses): one JSON request per stdin line, one JSON answer per line on the real stdout
# ------------------------------------------------------------------------------------------------
def _answer_channel():
    """Keep the real stdout for answers; anything a library prints goes to stderr instead."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def worker_flops(runner, images, ids, batch: int, torch) -> dict[str, Any]:
    """FLOPs of one training forward+backward and one image-tower inference (FlopCounterMode)."""

    def train_pass():
        runner.opt.zero_grad(set_to_none=True)
        runner.forward_loss(images, ids).backward()

    def infer_pass():
        runner.model.eval()
        with torch.no_grad():
            runner.encode_image(images)
        runner.model.train()

    train_flops, train_ops = count_flops(train_pass)
    infer_flops, _ = count_flops(infer_pass)
    runner.opt.zero_grad(set_to_none=True)
    return {
        "train_flops_per_sample": train_flops / batch,
        "train_flops_by_op": {k: v / batch for k, v in train_ops.items()},
        "infer_flops_per_image": infer_flops / batch,
    }


def worker(args: argparse.Namespace) -> None:
    out = _answer_channel()
    rss_start = rss_mb()
    import torch

    torch.set_num_threads(args.threads)
    config = json.loads(Path(args.config).read_text(encoding="utf-8"))
    if args.worker == "lipkit":
        runner: LipkitRunner | OpenClipRunner = LipkitRunner(config["spec"], args)
    else:
        runner = OpenClipRunner(config["open_clip"], args)
    rss_import = rss_mb()
    images, ids, checksum, mean_len = synthetic(config["spec"], args.batch, args.seed)
    if args.flops:
        # its own process: the FLOP counter imports torch._dynamo and more (~160 MB of RSS), which the
        # measured worker's peak must not hold
        out.write(json.dumps(worker_flops(runner, images, ids, args.batch, torch)) + "\n")
        return
    losses = [runner.step(images, ids) for _ in range(args.warmup)]
    runner.model.eval()
    with torch.no_grad():
        runner.encode_image(images)
    runner.model.train()
    out.write(
        json.dumps(
            {
                "params": runner.num_params(),
                "checksum": checksum,
                "mean_tokens": mean_len,
                "warmup_losses": losses,
                "rss_start_mb": rss_start,
                "rss_ready_mb": rss_import,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "malloc_tuned": getattr(runner, "malloc_tuned", False)
                or "MALLOC_MMAP_THRESHOLD_" in os.environ,
            }
        )
        + "\n"
    )
    for line in sys.stdin:
        req = json.loads(line)
        cmd, n = req["cmd"], req.get("n", 1)
        if cmd == "train":
            faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            losses = [runner.step(images, ids) for _ in range(n)]
            dt = time.perf_counter() - t
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
            ans: dict[str, Any] = {"seconds": dt, "rate": n * args.batch / dt, "loss": losses[-1]}
            ans["page_faults_per_step"] = faults
        elif cmd == "infer":
            runner.model.eval()
            with torch.no_grad():
                t = time.perf_counter()
                for _ in range(n):
                    runner.encode_image(images)
                dt = time.perf_counter() - t
            runner.model.train()
            ans = {"seconds": dt, "rate": n * args.batch / dt}
        elif cmd == "profile":
            ans = profile(runner, images, ids, n, torch)
            ans.update(runner.extra(args))
        elif cmd == "rss":
            ans = {"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()}
        elif cmd == "exit":
            out.write(json.dumps({"peak_rss_mb": peak_rss_mb()}) + "\n")
            return
        else:
            ans = {"error": f"unknown command {cmd}"}
        out.write(json.dumps(ans) + "\n")


def profile(runner, images, ids, steps: int, torch) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step(images, ids)
    wall = time.perf_counter() - t
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    rows = [e for e in events if not e.key.startswith("bench:")]
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
            "self_pct": 100 * e.self_cpu_time_total / total_self,
            "calls_per_step": e.count / steps,
        }
        for e in rows[:15]
    ]
    phases = {
        e.key.removeprefix("bench:"): e.cpu_time_total / 1000 / steps
        for e in events
        if e.key.startswith("bench:")
    }
    table = events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=64)
    return {"wall_ms_per_step": 1000 * wall / steps, "top": top, "phases_ms_per_step": phases, "table": table}


def peak_worker(args: argparse.Namespace) -> None:
    """Large matmuls at the benchmark's thread count: the machine's practical peak FLOP/s."""
    out = _answer_channel()
    import torch

    torch.set_num_threads(args.threads)
    n = args.matmul_size
    mats = {
        dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)
    }
    for a, b in mats.values():
        torch.matmul(a, b)
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "exit":
            out.write(json.dumps({"peak_rss_mb": peak_rss_mb()}) + "\n")
            return
        ans = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = mats[dt]
            times = []
            for _ in range(req.get("n", 5)):
                t = time.perf_counter()
                torch.matmul(a, b)
                times.append(time.perf_counter() - t)
            # the best of the loop is the peak; the median shows how much the load moved it
            ans[name] = 2 * n**3 / min(times)
            ans[name + "_median"] = 2 * n**3 / statistics.median(times)
        out.write(json.dumps(ans) + "\n")


def check_worker(args: argparse.Namespace) -> None:
    """Same configuration in both libraries: parameter counts and outputs with lipkit's weights."""
    out = _answer_channel()
    import open_clip
    import torch

    from lipkit.interop.open_clip import open_clip_model_config, state_to_open_clip
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    torch.manual_seed(args.seed)
    spec = get_spec(args.preset)
    if (spec.eot_id, spec.pad_id) != (EOT_ID, PAD_ID):
        raise SystemExit(f"preset {args.preset} uses eot {spec.eot_id}/pad {spec.pad_id}; bench expects 2/0")
    cfg = open_clip_model_config(spec)
    ours = DualEncoder(spec).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{OC_NAME}.json"
        path.write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(path)
    peer = open_clip.create_model(OC_NAME, pretrained=None, device="cpu").eval()
    n_ours = ours.num_params()
    n_peer = sum(p.numel() for p in peer.parameters())
    ans: dict[str, Any] = {
        "spec": spec.to_dict(),
        "open_clip": cfg,
        "params_lipkit": n_ours,
        "params_open_clip": n_peer,
        "torch": torch.__version__,
        "open_clip_version": getattr(open_clip, "__version__", "?"),
    }
    if n_ours == n_peer:
        missing, unexpected = peer.load_state_dict(state_to_open_clip(ours.state_dict()), strict=False)
        images, ids, _, _ = synthetic(spec.to_dict(), 8, args.seed)
        with torch.no_grad():
            di = (ours.encode_image(images) - peer.encode_image(images, normalize=True)).abs().max()
            dt = (ours.encode_text(ids) - peer.encode_text(ids, normalize=True)).abs().max()
        ans.update(
            max_abs_diff_image=float(di),
            max_abs_diff_text=float(dt),
            missing=list(missing),
            unexpected=list(unexpected),
        )
    out.write(json.dumps(ans) + "\n")


# ------------------------------------------------------------------------------------------------
# the parent: start workers, interleave, summarise
# ------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
            text=True,
            env=env,
        )
        self.first = self.read()

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.proc.args[2:]} died (exit {self.proc.wait()}); see stderr above")
        return json.loads(line)

    def ask(self, cmd: str, n: int = 1) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "n": n}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict[str, Any]:
        ans = self.ask("exit")
        self.proc.wait()
        return ans


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        uptime = "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    return {"cpu": model, "cores": os.cpu_count(), "uptime": uptime, "python": platform.python_version()}


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt_rate(values: list[float]) -> str:
    med, lo, hi = spread(values)
    return f"{med:8.1f} [{lo:.1f}–{hi:.1f}]"


def fmt_ratio(values: list[float]) -> str:
    med, lo, hi = spread(values)
    return f"{med:.2f} [{lo:.2f}–{hi:.2f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per library and precision")
    ap.add_argument("--infer-steps", type=int, default=0, help="timed inference batches (default: 2×steps)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds the steps are split into")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps per worker")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (autocast)")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps profiled per worker (0: none)")
    ap.add_argument("--profile-peer", action="store_true", help="also print OpenCLIP's profile table")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument(
        "--omp-wait-policy",
        choices=["inherit", "passive", "active"],
        default="inherit",
        help="OMP_WAIT_POLICY for every worker (inherit: this shell's, usually unset = spin)",
    )
    ap.add_argument(
        "--peer-malloc",
        action="store_true",
        help="give OpenCLIP's workers the glibc malloc settings lipkit's Trainer applies to itself "
        "(lipkit/malloc.py), as MALLOC_*_ environment variables",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all results to this file")
    ap.add_argument("--worker", choices=["lipkit", "open_clip", "peak", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)  # worker: count FLOPs, exit
    args = ap.parse_args(argv)

    if args.worker in LIBS:
        worker(args)
        return {}
    if args.worker == "peak":
        peak_worker(args)
        return {}
    if args.worker == "check":
        check_worker(args)
        return {}

    for module, package in (("open_clip", "open_clip_torch"), ("open_clip_train", "open_clip_torch")):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"bench_train compares against OpenCLIP: pip install {package} (or '.[dev]').")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        ap.error("--precision takes fp32 and/or bf16, e.g. fp32,bf16")
    reps = max(1, min(args.reps, args.steps))
    train_n = max(1, math.ceil(args.steps / reps))
    infer_n = max(1, math.ceil((args.infer_steps or 2 * args.steps) / reps))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    peer_env = dict(env)
    if args.peer_malloc:
        sys.path.insert(0, str(ROOT / "src"))
        from lipkit.malloc import as_environment

        peer_env.update(as_environment())
    common = ["--preset", args.preset, "--threads", str(args.threads), "--seed", str(args.seed)]
    info: dict[str, Any] = {"machine_before": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {info['machine_before']['cpu']}, {info['machine_before']['cores']} cores")
    print(f"load before: {info['machine_before']['uptime']}")
    info["omp_wait_policy"] = env.get("OMP_WAIT_POLICY", "unset")
    info["peer_malloc"] = args.peer_malloc
    print(f"threads {args.threads}, OMP_WAIT_POLICY={info['omp_wait_policy']}")

    check = Worker(["--worker", "check", *common], env).first
    info["check"] = check
    print(
        f"torch {check['torch']}, open_clip {check['open_clip_version']}; preset {args.preset}: "
        f"parameters lipkit {check['params_lipkit']:,} / OpenCLIP {check['params_open_clip']:,}"
    )
    if check["params_lipkit"] != check["params_open_clip"]:
        raise SystemExit("the two models differ in parameter count; fix the config mapping first")
    print(
        f"same weights → same outputs: max |Δ| image {check['max_abs_diff_image']:.2e}, "
        f"text {check['max_abs_diff_text']:.2e}"
    )

    tmp_dir = Path(tempfile.mkdtemp(prefix="bench_train-"))
    cfg_file = tmp_dir / "config.json"
    cfg_file.write_text(
        json.dumps({"spec": check["spec"], "open_clip": check["open_clip"]}), encoding="utf-8"
    )
    workers: dict[tuple[str, str], Worker] = {}
    peak: Worker | None = None
    try:
        for prec in precisions:
            for lib in LIBS:
                argv = [
                    "--worker", lib, "--config", str(cfg_file), "--precision", prec,
                    "--batch", str(args.batch), "--warmup", str(args.warmup),
                    "--lr", str(args.lr), "--weight-decay", str(args.weight_decay), *common,
                ]  # fmt: skip
                counter = Worker([*argv, "--flops"], peer_env if lib == "open_clip" else env)
                counter.proc.wait()  # FLOPs in a process of their own: not in the measured peak RSS
                w = Worker(argv, peer_env if lib == "open_clip" else env)
                w.first.update(counter.first)
                workers[lib, prec] = w
                f = w.first
                print(
                    f"  {lib:9s} {prec}: ready, {f['train_flops_per_sample'] / 1e9:.3f} GFLOP/sample "
                    f"(train fwd+bwd), warm-up loss {f['warmup_losses'][0] if f['warmup_losses'] else 'nan':.4}"
                )
        peak = Worker(["--worker", "peak", "--matmul-size", str(args.matmul_size), *common], env)
        sums = {w.first["checksum"] for w in workers.values()}
        if len(sums) != 1:
            raise SystemExit(f"workers built different data (checksums {sums})")

        train: dict[tuple[str, str], list[float]] = {k: [] for k in workers}
        infer: dict[tuple[str, str], list[float]] = {k: [] for k in workers}
        faults: dict[tuple[str, str], list[float]] = {k: [] for k in workers}
        peaks: dict[str, list[float]] = {"fp32": [], "bf16": [], "fp32_median": [], "bf16_median": []}
        print(
            f"{reps} interleaved rounds × ({train_n} train steps + {infer_n} inference batches) "
            f"per library and precision, batch {args.batch}, {args.threads} threads"
        )
        for r in range(reps):
            order = LIBS if r % 2 == 0 else LIBS[::-1]
            for prec in precisions:
                for lib in order:
                    ans = workers[lib, prec].ask("train", train_n)
                    train[lib, prec].append(ans["rate"])
                    faults[lib, prec].append(ans["page_faults_per_step"])
            for prec in precisions:
                for lib in order:
                    infer[lib, prec].append(workers[lib, prec].ask("infer", infer_n)["rate"])
            for k, v in peak.ask("peak", 5).items():
                peaks[k].append(v)
            print(
                f"  round {r + 1}/{reps}: "
                + ", ".join(
                    f"{lib} {prec} {train[lib, prec][-1]:.1f}/s" for prec in precisions for lib in order
                )
            )

        # the training peak: warm-up, the timed training and inference; not the profiler's records
        training_peak = {k: w.ask("rss")["peak_rss_mb"] for k, w in workers.items()}
        profiles: dict[str, Any] = {}
        if args.profile_steps:
            for (lib, prec), w in workers.items():
                profiles[f"{lib}/{prec}"] = w.ask("profile", args.profile_steps)
        closing = {k: w.close() for k, w in workers.items()}
        peak.close()
    finally:
        for w in [*workers.values(), peak]:
            if w is not None and w.proc.poll() is None:
                w.proc.kill()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    info["machine_after"] = machine()

    # ---- summary --------------------------------------------------------------------------------
    # the machine's peak: the best matmul rate seen in any round (the load only ever lowers it)
    peak_flops = {p: max(peaks[p]) for p in ("fp32", "bf16")}
    rows, results = [], {}
    for prec in precisions:
        for lib in LIBS:
            k = (lib, prec)
            first = workers[k].first
            tr, inf = statistics.median(train[k]), statistics.median(infer[k])
            res = {
                "train_samples_per_s": spread(train[k]),
                "infer_images_per_s": spread(infer[k]),
                "train_rounds": train[k],
                "infer_rounds": infer[k],
                "peak_rss_mb": training_peak[k],
                "peak_rss_with_profiler_mb": closing[k]["peak_rss_mb"],
                "rss_ready_mb": first["rss_ready_mb"],
                "rss_start_mb": first["rss_start_mb"],
                "train_gflops_per_sample": first["train_flops_per_sample"] / 1e9,
                "infer_gflops_per_image": first["infer_flops_per_image"] / 1e9,
                "train_flops_by_op": first["train_flops_by_op"],
                "train_pct_of_peak": 100 * tr * first["train_flops_per_sample"] / peak_flops[prec],
                "infer_pct_of_peak": 100 * inf * first["infer_flops_per_image"] / peak_flops[prec],
                "params": first["params"],
                "page_faults_per_step": statistics.median(faults[k]),
                "malloc_tuned": first["malloc_tuned"],
            }
            results[f"{lib}/{prec}"] = res
            name = "lipkit" if lib == "lipkit" else "OpenCLIP"
            rows.append(
                f"| {name:8s} | {prec} | {fmt_rate(train[k])} | {res['train_pct_of_peak']:5.1f}% "
                f"| {fmt_rate(infer[k])} | {res['infer_pct_of_peak']:5.1f}% | {res['peak_rss_mb']:7.0f} |"
            )
        ratio_t = [a / b for a, b in zip(train["lipkit", prec], train["open_clip", prec], strict=True)]
        ratio_i = [a / b for a, b in zip(infer["lipkit", prec], infer["open_clip", prec], strict=True)]
        ratio_m = results[f"lipkit/{prec}"]["peak_rss_mb"] / results[f"open_clip/{prec}"]["peak_rss_mb"]
        results[f"ratio/{prec}"] = {
            "train": spread(ratio_t),
            "infer": spread(ratio_i),
            "peak_rss": ratio_m,
        }
        rows.append(
            f"| **ratio** | {prec} | {fmt_ratio(ratio_t)} | | {fmt_ratio(ratio_i)} | | {ratio_m:.2f} |"
        )
    lk = results[f"lipkit/{precisions[0]}"]
    print()
    print(
        f"model FLOPs: training {lk['train_gflops_per_sample']:.3f} GFLOP/sample (forward+backward), "
        f"inference {lk['infer_gflops_per_image']:.3f} GFLOP/image (image tower); OpenCLIP: "
        f"{results[f'open_clip/{precisions[0]}']['train_gflops_per_sample']:.3f} / "
        f"{results[f'open_clip/{precisions[0]}']['infer_gflops_per_image']:.3f}"
    )
    print(
        f"matmul peak ({args.matmul_size}², {args.threads} threads, best of {reps} rounds): "
        f"fp32 {peak_flops['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak_flops['bf16'] / 1e9:.1f} GFLOP/s"
    )
    print()
    header = (
        "| library | precision | train samples/s median [min–max] | % matmul peak "
        "| inference images/s median [min–max] | % matmul peak | peak RSS MiB |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("ratio = lipkit / OpenCLIP (median of per-round ratios; > 1 means lipkit is faster or bigger)")
    memory, faults_line = [], []
    for prec in precisions:
        for lib in LIBS:
            res, name = results[f"{lib}/{prec}"], "lipkit" if lib == "lipkit" else "OpenCLIP"
            ready, peak_mb = res["rss_ready_mb"], res["peak_rss_mb"]
            memory.append(
                f"{name} {prec} {ready:.0f} → {peak_mb:.0f} (+{peak_mb - ready:.0f}; "
                f"{res['peak_rss_with_profiler_mb']:.0f} after profiling)"
            )
            tuned = " (malloc tuned)" if res["malloc_tuned"] else ""
            faults_line.append(f"{name} {prec} {res['page_faults_per_step']:,.0f}{tuned}")
    print(
        "RSS before the first step (imports, model, optimizer without its moments) → peak, MiB: "
        + ", ".join(memory)
    )
    print("page faults per training step (median): " + ", ".join(faults_line))
    for key, prof in profiles.items():
        if key.startswith("lipkit") or args.profile_peer:
            print(f"\nprofile {key}: {prof['wall_ms_per_step']:.0f} ms/step under the profiler; phases (ms):")
            print("  " + ", ".join(f"{k} {v:.0f}" for k, v in prof["phases_ms_per_step"].items()))
            if "augment_ms_per_batch" in prof:
                print(
                    f"  (Trainer.step's on-batch augmentation adds {prof['augment_ms_per_batch']:.0f} ms/step)"
                )
            print("| op (self CPU time) | ms/step | % of self time | calls/step |")
            print("|---|---|---|---|")
            for row in prof["top"][:10]:
                print(
                    f"| `{row['op']}` | {row['self_ms_per_step']:.1f} | {row['self_pct']:.1f}% "
                    f"| {row['calls_per_step']:.0f} |"
                )
    print(f"load after: {info['machine_after']['uptime']}")
    summary = {
        **info,
        "results": results,
        "matmul_peak_flops": peak_flops,
        "matmul_rounds": peaks,
        "profiles": profiles,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
