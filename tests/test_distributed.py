"""Two gloo processes on the CPU train exactly like one process on the same global batch; gradient
caching gives the gradients of the plain step."""

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from lipkit.config import AugmentConfig, TrainConfig
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train import fsdp
from lipkit.train.distributed import Dist, sync_step
from lipkit.train.trainer import Trainer

WORDS = ["red", "blue", "heart", "face", "flag", "hand", "star", "cat", "dog", "sun", "moon", "tree"]
SPEC = {
    "vision_width": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_width": 32,
    "text_layers": 2,
    "text_heads": 2,
    "embed_dim": 16,
    "image_size": 32,
    "context_length": 12,
}
BATCH = 8


def batch(per_image: int = 1):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)
    captions = [  # distinct texts; a third caption is a label shared by images 0, 3, 6 (across ranks) etc.
        f"{WORDS[(i + c) % 12]} {WORDS[(i * 5 + 3) % 12]}" if c < 2 else f"a {WORDS[i % 3]}"
        for i in range(BATCH)
        for c in range(per_image)
    ]
    return images, captions


def make_trainer(tmp: Path, rank: int, world: int, per_image: int = 1, **train) -> Trainer:
    torch.manual_seed(0)
    tok = TextTokenizer.train(WORDS * 3, vocab_size=300, context_length=12)
    lexicon = tok.vocab_size if train.get("objective") == "lexlip" else 0
    spec = get_spec("tiny", **SPEC, vocab_size=tok.vocab_size, eot_id=tok.eot_id, lexicon_vocab=lexicon)
    cfg = TrainConfig(batch_size=BATCH, **{"grad_clip": 0.0, **train})
    return Trainer(
        DualEncoder(spec),
        build_objective(cfg.objective, **cfg.objective_args),
        tok,
        cfg,
        AugmentConfig(),
        tmp,
        torch.device("cpu"),
        captions_per_image=per_image,
        dist=Dist(rank, world),
    )


def one_step(tmp: Path, rank: int, world: int, per_image: int = 1, **train) -> dict[str, torch.Tensor]:
    trainer = make_trainer(tmp, rank, world, per_image, **train)
    model, cfg = trainer.model, trainer.cfg
    images, captions = batch(per_image)
    loss, finite = trainer.step(images, captions, lr=1e-3)
    assert finite
    if cfg.strategy == "fsdp" and world > 1:  # each rank really holds about half of the weights
        local = sum(p.to_local().numel() if fsdp.is_sharded(p) else p.numel() for p in model.parameters())
        assert local < 0.55 * model.num_params()
    # full tensors (under FSDP each rank holds shards: gathering them is a collective, same order on all)
    grads = {
        f"grad.{n}": fsdp.full(p.grad).detach().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    assert len(grads) > 20
    weights = {f"param.{n}": fsdp.full(p).detach().clone() for n, p in model.named_parameters()}
    state = trainer.training_state()  # AdamW moments after the step, as a checkpoint stores them
    optim = {k: v.clone() for k, v in state[0].items() if k.startswith("optim.") and v.ndim}
    out = {"loss": loss.reshape(1), **grads, **weights, **optim}
    plain = trainer.unsharded()  # what eval and checkpoints read: every weight, in place (rank 0)
    if rank == 0:
        out.update({f"unsharded.{k}": v.detach().clone() for k, v in plain.state_dict().items()})
    # resume: a fresh trainer loads the saved state (FSDP: full moments re-sharded) and gives it back
    again = make_trainer(tmp, rank, world, per_image, **train)
    again.load_training_state(state)
    back = again.training_state()[0]
    out.update({f"resumed.{k}": back[k].clone() for k in optim})
    return out


def _worker(rank: int, world: int, port: int, tmp: str, train: dict, per_image: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = one_step(Path(tmp), rank, world, per_image, **train)
        save_file(out, os.path.join(tmp, f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def _sync_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:  # rank 1 saw SIGTERM (15); rank 0 evaluated, so its training clock is behind
        signum, seconds = sync_step(15 if rank == 1 else None, 100.0 + 30 * rank)
        Path(tmp, f"sync{rank}.txt").write_text(f"{signum} {seconds}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_signal_and_clock(tmp_path):
    """The time budget and the schedule follow one clock on every rank (else the ranks stop at different
    steps and the job hangs in a collective)."""
    mp.spawn(_sync_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"sync{r}.txt").read_text() for r in range(2)] == ["15 100.0"] * 2


def _fit_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout: ranks that stop at different steps fail here instead of hanging the suite
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        trainer = make_trainer(Path(tmp), rank, world, epochs=1000, max_minutes=0.05, eval_every=2)
        images, captions = batch()

        def batches(epoch: int, first: int):
            for _ in range(first, 1000):
                yield images, captions, [f"k{i}" for i in range(BATCH)]

        def evaluate(model, step: int) -> dict:
            time.sleep(0.3)  # only rank 0 evaluates: the others wait, and their own clocks run on
            return {}

        result = trainer.fit(batches, 1000, evaluate, None)
        Path(tmp, f"fit{rank}.txt").write_text(str(result.steps))
    finally:
        torch.distributed.destroy_process_group()


def test_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """Trainer.fit with a 3-second budget while rank 0 spends time evaluating: every rank reads the common
    clock, so all stop after the same step (with their own clocks rank 1 stopped first and rank 0 hung)."""
    mp.spawn(_fit_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    steps = [int((tmp_path / f"fit{r}.txt").read_text()) for r in range(2)]
    assert steps[0] == steps[1] and 2 < steps[0] < 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(tmp: Path, per_image: int = 1, **train) -> list[dict[str, torch.Tensor]]:
    mp.spawn(_worker, args=(2, free_port(), str(tmp), train, per_image), nprocs=2, join=True)
    return [load_file(str(tmp / f"rank{r}.safetensors")) for r in range(2)]


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    for k in a:
        # AdamW's first step moves a weight by lr·g/(|g| + ε): ~lr wherever |g| ≫ ε, so a gradient of
        # 1e-8 that differs in its last bits moves it a few 1e-5. Weights after the step are compared to a
        # tenth of one step (lr 1e-3); a misplaced or missing update would be off by ~lr.
        tol = 1e-4 if k.startswith(("param.", "unsharded.")) else atol
        assert torch.allclose(a[k], b[k], atol=tol), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize(
    "local_loss,strategy", [(False, "ddp"), (True, "ddp"), (False, "fsdp"), (True, "fsdp")]
)
def test_two_gloo_ranks_equal_one_process(tmp_path, local_loss, strategy):
    single = one_step(tmp_path, 0, 1)
    ranks = run_two(tmp_path, local_loss=local_loss, strategy=strategy)
    same = {k: v for k, v in single.items() if k != "loss"}
    for rank, r in enumerate(ranks):  # every rank holds the averaged gradient of the global loss, the same
        # weights after the step and (gathered) the same AdamW moments, before and after a resume
        assert_close({k: r[k] for k in same if rank == 0 or not k.startswith("unsharded.")}, same)
    losses = torch.stack([r["loss"] for r in ranks])
    if local_loss:  # each rank owns half the rows: their mean is the global loss
        assert torch.allclose(losses.mean(), single["loss"], atol=1e-5)
    else:
        assert torch.allclose(losses, single["loss"].expand(2), atol=1e-5)


@pytest.mark.parametrize("objective", ["lexlip", "infonce"])
def test_fsdp_with_lexicon_heads_and_gradient_clipping(tmp_path, objective):
    """FSDP shards the LexLIP heads too; the global gradient norm over shards clips like one process
    (the unclipped norm here is ~80, so clipping to 1 changes every gradient)."""
    single = one_step(tmp_path, 0, 1, objective=objective, grad_clip=1.0)
    for r in run_two(tmp_path, objective=objective, grad_clip=1.0, strategy="fsdp"):
        assert_close(r, single)


@pytest.mark.parametrize("strategy,chunk", [("ddp", 0), ("fsdp", 0), ("fsdp", 3)])
def test_two_gloo_ranks_equal_one_process_multi_positive(tmp_path, strategy, chunk):
    """The demo's objective: two captions per image, owners offset by rank when gathered (and with
    gradient caching inside each rank: chunks of 3 and 1 of its 4 images)."""
    single = one_step(tmp_path, 0, 1, per_image=2, objective="multi_positive")
    for r in run_two(
        tmp_path, per_image=2, objective="multi_positive", strategy=strategy, grad_cache_chunk=chunk
    ):
        assert_close(r, single)


@pytest.mark.parametrize("strategy,chunk", [("ddp", 0), ("ddp", 3), ("fsdp", 0)])
def test_two_ranks_same_text_positives_match_across_ranks(tmp_path, strategy, chunk):
    """UniCL positives: a label caption shared by images on both ranks pairs them up in the global
    batch exactly as in one process (the caption keys are gathered with the features)."""
    args = {"objective": "multi_positive", "objective_args": {"same_text_positive": True}}
    single = one_step(tmp_path, 0, 1, per_image=3, **args)
    plain = one_step(tmp_path, 0, 1, per_image=3, objective="multi_positive")
    assert not torch.allclose(single["loss"], plain["loss"])  # the shared labels do change the loss
    for r in run_two(tmp_path, per_image=3, strategy=strategy, grad_cache_chunk=chunk, **args):
        assert_close(r, single)


@pytest.mark.parametrize("objective,per_image", [("infonce", 1), ("multi_positive", 2)])
def test_gradient_caching_equals_the_plain_step(tmp_path, objective, per_image):
    plain = one_step(tmp_path, 0, 1, per_image, objective=objective)
    cached = one_step(tmp_path, 0, 1, per_image, objective=objective, grad_cache_chunk=3)  # chunks 3, 3, 2
    assert_close(cached, plain)


def test_gradient_caching_replays_dropout(tmp_path):
    """A tower with dropout (an unlocked Hugging Face encoder has some): each chunk's re-embedding draws
    the same masks as its cached no-grad pass, so the features whose gradients were cached are the ones
    back-propagated (without the replay they differ in every chunk)."""
    trainer = make_trainer(tmp_path, 0, 1, 1, objective="infonce", grad_cache_chunk=3)
    visual = trainer.model.visual
    visual.ln_post = torch.nn.Sequential(visual.ln_post, torch.nn.Dropout(0.5))
    seen = []
    real = trainer._inputs

    def spy(images, ids, second):
        out = real(images, ids, second)
        seen.append(out["image_features"].detach().clone())
        return out

    trainer._inputs = spy
    images, captions = batch(1)
    _, finite = trainer.step(images, captions, lr=1e-3)
    assert finite and len(seen) == 6  # 3 chunks (3, 3, 2 images), twice
    for cached, again in zip(seen[:3], seen[3:], strict=True):
        assert torch.allclose(cached, again, atol=1e-6)


def test_batch_not_divisible_by_ranks_is_refused(tmp_path):
    with pytest.raises(UserError, match="not divisible by the 3 ranks"):
        tok = TextTokenizer.train(WORDS, vocab_size=300, context_length=12)
        model = DualEncoder(get_spec("tiny", **SPEC, vocab_size=tok.vocab_size, eot_id=tok.eot_id))
        Trainer(
            model,
            build_objective("infonce"),
            tok,
            TrainConfig(batch_size=8),
            AugmentConfig(),
            tmp_path,
            torch.device("cpu"),
            dist=Dist(0, 3),
        )
