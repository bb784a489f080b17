"""The measurements behind `lipkit quantize`'s choice: onnxruntime towers evaluated by `lipkit.eval` (the
same zero-shot and retrieval code as `lipkit eval`), and their throughput, fp32 and int8 interleaved.

`OrtModel` answers the few calls `eval.evaluate.evaluate_records` makes of a `DualEncoder`
(`embed_images_u8`, `encode_text`, `spec.image_size`, `device`, `eval`/`train`) with two onnxruntime
runs. Each run is wrapped in a `Memo` keyed by the input row's bytes, so a tower's embeddings are
computed once and reused when it is paired with the other tower's fp32 and int8 versions.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lipkit.config import EvalConfig
from lipkit.data.image_store import ImageStore
from lipkit.data.records import Record
from lipkit.data.transforms import normalize
from lipkit.eval.evaluate import evaluate_records
from lipkit.text.tokenizer import TextTokenizer

Run = Callable[[np.ndarray], np.ndarray]
T2I = "retrieval/text_to_image/R@1"


def session(ort: Any, path: Path, threads: int) -> Any:
    """An onnxruntime CPU session: `threads` intra-op threads (0: its default), spinning only under
    OMP_WAIT_POLICY=ACTIVE (as lipkit's runtime, search.onnx_encoder)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    spin = os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def image_run(sess: Any, cfg: dict[str, Any]) -> Run:
    """uint8 (B, 3, S, S) → embeddings, normalised as DualEncoder.embed_images_u8 does."""
    name, mean, std = cfg["image_input"], cfg["image_mean"], cfg["image_std"]
    return lambda u8: sess.run(None, {name: normalize(torch.from_numpy(u8), mean, std).numpy()})[0]


def text_run(sess: Any, cfg: dict[str, Any]) -> Run:
    """Padded token ids → embeddings, cut after the last non-padding column (as search.onnx_encoder)."""
    name, pad, longest = cfg["text_input"], cfg["pad_id"], cfg["max_text_length"]

    def run(ids: np.ndarray) -> np.ndarray:
        used = np.flatnonzero((ids != pad).any(0))
        n = max(2, min(int(used[-1]) + 1 if used.size else 2, longest))
        return sess.run(None, {name: np.ascontiguousarray(ids[:, :n])})[0]

    return run


class Memo:
    """`run` with its outputs kept per input row (rows are identified by their bytes)."""

    def __init__(self, run: Run) -> None:
        self.run, self.seen = run, {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]
        todo = {k: i for i, k in enumerate(keys) if k not in self.seen}
        if todo:
            self.seen.update(zip(todo, self.run(x[list(todo.values())]), strict=True))
        return np.stack([self.seen[k] for k in keys]).astype(np.float32, copy=False)


class OrtModel:
    """What `evaluate_records` uses of a DualEncoder, answered by an image run and a text run."""

    training = False
    has_lexicon = False
    device = torch.device("cpu")

    def __init__(self, image: Run, text: Run, image_size: int) -> None:
        self.image, self.text = image, text
        self.spec = SimpleNamespace(image_size=image_size)

    def eval(self) -> OrtModel:
        return self

    def train(self, mode: bool = True) -> OrtModel:
        return self

    def embed_images_u8(self, images_u8: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.image(images_u8.numpy()))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.text(ids.numpy()))


@dataclass
class EvalSet:
    """The evaluation table, its images decoded once, and the evaluation settings."""

    records: list[Record]
    store: ImageStore
    tokenizer: TextTokenizer
    cfg: EvalConfig

    def metrics(self, image: Run, text: Run) -> dict[str, float]:
        model = OrtModel(image, text, self.store.size)
        result = evaluate_records(
            model,  # type: ignore[arg-type]  # the calls evaluate_records makes, see OrtModel
            self.tokenizer,
            self.records,
            self.cfg,
            store=self.store,
            details=False,
            similarity="dense",
        )
        return result["metrics"]


def gated(metrics: dict[str, float]) -> list[str]:
    """The metrics a tower must keep: zero-shot top-1 of every class column, and text→image R@1."""
    return sorted(k for k in metrics if k.startswith("zeroshot/") and k.endswith("/top1")) + [T2I]


def drops(full: dict[str, float], int8: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    """Points lost per gated metric (positive: int8 is worse)."""
    return {k: round(100 * (full[k] - int8[k]), 4) for k in keys}


def interleaved_seconds(
    runs: dict[str, Callable[[], Any]],
    rounds: int,
    calls: int = 1,
    warmup: int = 1,
    after_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of `calls` calls of each run, per round: the order alternates between rounds so that all
    runs see the same load, after `warmup` untimed calls each. `after_round(r, times)` after each round."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            times[name].append(time.perf_counter() - t)
        if after_round is not None:
            after_round(r, times)
    return times


def rates(runs: dict[str, Callable[[], Any]], n: int, rounds: int = 5) -> dict[str, float]:
    """Items/s of each run (`n` items a call): the median of `rounds` interleaved rounds."""
    times = interleaved_seconds(runs, rounds)
    return {k: round(n / statistics.median(v), 1) for k, v in times.items()}
