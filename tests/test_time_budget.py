"""The time budget (train.max_minutes) on a fake training clock, so the outcome does not depend on how
loaded the machine is: the run stops after exactly the step whose training time reaches the budget,
evaluation time is not training time, and two gloo ranks, one of which waits while the other evaluates,
stop after the same step because they follow the ranks' common clock."""

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

import lipkit.train.clock
from conftest import free_port
from lipkit.config import AugmentConfig, TrainConfig
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.distributed import Dist
from lipkit.train.trainer import Trainer

WORDS = ["red", "blue", "heart", "face", "flag", "hand", "star", "cat"]
BATCH = 4
STEP_SECONDS = 0.5  # the fake training time of one step
EVAL_SECONDS = 2.0  # the fake time of one evaluation (rank 0); the other ranks wait as long
BUDGET_MINUTES = 0.05  # 3 s: the sixth step reaches it
EXPECTED_STEPS = 6


class FakeTime:
    """Stands in for the `time` module of lipkit.train.clock: the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def make_trainer(tmp: Path, dist: Dist) -> Trainer:
    torch.manual_seed(0)
    tok = TextTokenizer.train(WORDS * 3, vocab_size=300, context_length=8)
    spec = get_spec(
        "tiny",
        vision_width=16,
        vision_layers=1,
        vision_heads=2,
        text_width=16,
        text_layers=1,
        text_heads=2,
        embed_dim=8,
        image_size=16,
        patch_size=8,
        context_length=8,
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
    )
    cfg = TrainConfig(
        batch_size=BATCH * dist.world, epochs=1000, max_minutes=BUDGET_MINUTES, eval_every=2, threads=1
    )
    return Trainer(
        DualEncoder(spec),
        build_objective("infonce"),
        tok,
        cfg,
        AugmentConfig(),
        tmp,
        torch.device("cpu"),
        dist=dist,
    )


def fit_on_fake_clock(tmp: Path, dist: Dist) -> tuple[int, list[int]]:
    """(steps run, steps evaluated) with every step taking STEP_SECONDS and every evaluation
    EVAL_SECONDS, on rank 0; the other ranks spend that time waiting for rank 0 (training time to them)."""
    fake = FakeTime()
    lipkit.train.clock.time = fake
    trainer = make_trainer(tmp, dist)
    n = BATCH  # each rank reads its share of the global batch (BATCH · world)
    images = torch.randint(
        0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    captions = [f"{WORDS[i % 8]} {WORDS[(i * 3 + 1) % 8]}" for i in range(n)]
    evaluated: list[int] = []

    def batches(epoch: int, first: int):
        for step in range(first, 1000):
            waited = EVAL_SECONDS if dist.rank and step and step % 2 == 0 else 0.0
            fake.now += STEP_SECONDS + waited
            yield images, captions, [f"k{i}" for i in range(n)]

    def evaluate(model, step: int) -> dict:
        evaluated.append(step)
        fake.now += EVAL_SECONDS
        return {}

    result = trainer.fit(batches, 1000, evaluate, None)
    return result.steps, evaluated


def test_budget_stops_after_the_step_that_reaches_it_and_evaluation_does_not_count(tmp_path, monkeypatch):
    monkeypatch.setattr(lipkit.train.clock, "time", lipkit.train.clock.time)  # restored afterwards
    steps, evaluated = fit_on_fake_clock(tmp_path, Dist())
    # 6 × 0.5 s of training reach the 3 s budget; the 2 s evaluations after steps 2 and 4 are left out
    # (counted, the budget would end the run after step 4); the final evaluation runs at the stop
    assert steps == EXPECTED_STEPS
    assert evaluated[:2] == [2, 4] and evaluated[-1] == EXPECTED_STEPS


def _fit_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # ranks that stop at different steps fail in a collective here instead of hanging the suite
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        steps, _ = fit_on_fake_clock(Path(tmp), Dist(rank, world))
        Path(tmp, f"fit{rank}.txt").write_text(str(steps))
    finally:
        torch.distributed.destroy_process_group()


def test_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 0 spends 2 s evaluating after every second step while rank 1 waits: on its own clock rank 1
    would reach the budget after step 3 and leave rank 0 hung; on the common clock both stop after 6."""
    mp.spawn(_fit_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [int((tmp_path / f"fit{r}.txt").read_text()) for r in range(2)] == [EXPECTED_STEPS] * 2
