"""The local forms of the objectives (train.local_losses) against one process on the global batch.

Every case runs inside ONE gloo spawn per world size (the spawn's start-up dominates): each rank takes
its rows of seeded global inputs (fp32, with gradients), computes its local loss and back-propagates it.
One process then computes the objective on the whole batch: the mean of the ranks' losses is the global
loss, and each rank's input gradient (Σ_s ∂L_s/∂x_r, which the gathers' and the ring's backward sum),
divided by W, is the global gradient of its rows; the scale's and bias' are summed over ranks first.
"""

import gc
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import free_port
from lipkit.config import TrainConfig
from lipkit.errors import UserError
from lipkit.objectives import OBJECTIVES, build_objective
from lipkit.train.distributed import Dist, check_scaling, gather_inputs
from lipkit.train.local_losses import LOCAL_FORMS, local_loss
from live_tensors import LiveTensors


def objective_case(name: str) -> dict:
    """test_distributed.objective_case, spelled out: two captions per image for multi_positive."""
    return {"objective": name, "per_image": 2 if name == "multi_positive" else 1, "steps": 3}


UNICL = {"objective": "multi_positive", "objective_args": {"same_text_positive": True}, "per_image": 3}
# trainer-level two-rank cases for tests/test_distributed.py: name → (two-rank case, one-process case)
LOCAL_CASES: dict[str, tuple[dict, dict]] = {
    "siglip-ring": ({**objective_case("siglip"), "local_loss": True}, objective_case("siglip")),
    "multi_positive-local": (
        {**objective_case("multi_positive"), "local_loss": True},
        objective_case("multi_positive"),
    ),
    "unicl-local": ({**UNICL, "local_loss": True}, UNICL),  # label captions shared across the ranks
    "filip-local": ({**objective_case("filip"), "local_loss": True}, objective_case("filip")),
    "siglip-ring-grad-cache": (
        {**objective_case("siglip"), "local_loss": True, "grad_cache_chunk": 3},
        objective_case("siglip"),
    ),
    "siglip-ring-fsdp": (
        {**objective_case("siglip"), "local_loss": True, "strategy": "fsdp"},
        objective_case("siglip"),
    ),
}

B_LOCAL, DIM, N_TOKENS, LENGTH = 4, 8, 3, 5
# the SigLIP memory claim's local batch and width: features narrow enough that ten b × D blocks weigh
# less than one b × b block, so a third logit block cannot hide in the feature allowance
MEMORY_B, MEMORY_DIM = 128, 4
# name → (objective, its options): every case runs on every rank of every spawn
CASES = {
    "siglip": ("siglip", {}),
    "siglip-chunked": ("siglip", {"chunk_size": 3}),
    "infonce": ("infonce", {}),
    "multi_positive": ("multi_positive", {}),
    "unicl": ("multi_positive", {"same_text_positive": True}),
    "filip": ("filip", {}),
}


def global_inputs(name: str, world: int) -> dict[str, torch.Tensor]:
    """The global batch of case `name` (W·B_LOCAL images; two captions per image for multi-positive; the
    second caption of each image one of three label texts shared across ranks), the same on every rank."""
    g = torch.Generator().manual_seed(7)
    n = world * B_LOCAL

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    scale, bias = torch.tensor(4.0), torch.tensor(-2.5)
    if name.startswith("siglip"):
        return {
            "image_features": unit(n, DIM),
            "text_features": unit(n, DIM),
            "logit_scale": scale,
            "logit_bias": bias,
        }
    if name == "infonce":
        return {"image_features": unit(n, DIM), "text_features": unit(n, DIM), "logit_scale": scale}
    if name in ("multi_positive", "unicl"):
        keys = torch.stack([100 + torch.arange(n), torch.arange(n) % 3], dim=1).reshape(-1)
        owner = torch.arange(n).repeat_interleave(2)
        out = {"image_features": unit(n, DIM), "text_features": unit(2 * n, DIM), "caption_owner": owner}
        return {**out, "logit_scale": scale, **({"caption_key": keys} if name == "unicl" else {})}
    lengths = torch.randint(1, LENGTH + 1, (n,), generator=g)
    mask = torch.arange(LENGTH)[None] < lengths[:, None]  # padding after each caption's real tokens
    tokens = {"image_tokens": unit(n, N_TOKENS, DIM), "text_tokens": unit(n, LENGTH, DIM)}
    return {**tokens, "text_mask": mask, "logit_scale": scale}


def rank_rows(inputs: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s local inputs, as the trainer makes them: its rows, caption owners as local indices."""
    out = {}
    for key, x in inputs.items():
        if x.ndim == 0:
            out[key] = x.clone()
            continue
        per = x.shape[0] // world
        out[key] = x[rank * per : (rank + 1) * per].clone()
    if "caption_owner" in out:
        out["caption_owner"] = out["caption_owner"] - rank * (inputs["image_features"].shape[0] // world)
    return out


def with_grad(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}


def siglip_memory(d: Dist, local: bool) -> torch.Tensor:
    """(largest tensor in elements, peak live bytes) of the SigLIP loss's forward + backward at local
    batch MEMORY_B: the ring, or the gathered global form (gather_inputs, then the objective)."""
    g = torch.Generator().manual_seed(11 + d.rank)
    x, y = (F.normalize(torch.randn(MEMORY_B, MEMORY_DIM, generator=g), dim=-1) for _ in range(2))
    inputs = with_grad({"image_features": x, "text_features": y})
    inputs.update(logit_scale=torch.tensor(10.0, requires_grad=True), logit_bias=torch.tensor(-10.0))
    objective = build_objective("siglip")
    with LiveTensors() as mode:
        loss = local_loss(objective, inputs, d) if local else objective(**gather_inputs(inputs, d, MEMORY_B))
        loss.backward()
        del loss
    return torch.tensor([mode.largest, mode.peak])


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    d = Dist(rank, world)
    try:
        for name, (objective_name, options) in CASES.items():
            try:
                inputs = with_grad(rank_rows(global_inputs(name, world), rank, world))
                loss = local_loss(build_objective(objective_name, **options), inputs, d)
                loss.backward()
                grads = {f"grad.{k}": v.grad for k, v in inputs.items() if v.is_floating_point()}
                save_file({"loss": loss.detach().reshape(1), **grads}, os.path.join(tmp, f"{name}.{rank}.st"))
            except Exception:
                Path(tmp, f"{name}.{rank}.error").write_text(traceback.format_exc())
        memory = {kind: siglip_memory(d, kind == "ring") for kind in ("ring", "gathered")}
        save_file(memory, os.path.join(tmp, f"memory.{rank}.st"))
    except Exception:
        Path(tmp, f"memory.{rank}.error").write_text(traceback.format_exc())
    finally:
        # what the dispatch mode saw sits in reference cycles; freed after the group is gone, its
        # collectives' state aborts the process now and then (1 run in 10): free it first
        gc.collect()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}-ranks")
def spawned(request, tmp_path_factory) -> tuple[int, Path]:
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ranks{world}")
    mp.spawn(_worker, args=(world, free_port(), str(tmp)), nprocs=world, join=True)
    return world, tmp


def results(tmp: Path, world: int, name: str) -> list[dict[str, torch.Tensor]]:
    for r in range(world):
        error = tmp / f"{name}.{r}.error"
        if error.exists():
            pytest.fail(f"rank {r} of {name} failed:\n{error.read_text()}")
    return [load_file(str(tmp / f"{name}.{r}.st")) for r in range(world)]


@pytest.mark.parametrize("name", list(CASES))
def test_local_form_equals_one_process(spawned, name):
    """fp32: mean of the ranks' losses = the global loss; gradients of every input to 1e-5."""
    world, tmp = spawned
    ranks = results(tmp, world, name)
    objective_name, options = CASES[name]
    inputs = with_grad(global_inputs(name, world))
    loss = build_objective(objective_name, **options)(**inputs)
    loss.backward()
    if name == "unicl":  # not vacuous: the label texts shared across ranks do pair images up
        assert not torch.allclose(loss, build_objective("multi_positive")(**inputs))
    if name == "filip":
        assert not inputs["text_mask"].all()  # some captions are padded
    assert torch.allclose(torch.cat([r["loss"] for r in ranks]).mean(), loss.detach(), atol=1e-5)
    worst = 0.0
    for key, x in inputs.items():
        if not x.is_floating_point():
            continue
        got = [r[f"grad.{key}"] / world for r in ranks]
        mine = torch.stack(got).sum(0) if x.ndim == 0 else torch.cat(got)  # scale, bias: summed over ranks
        assert torch.allclose(mine, x.grad, atol=1e-5), (key, (mine - x.grad).abs().max())
        assert x.grad.abs().max() > 1e-4, key  # not a vacuous comparison
        worst = max(worst, (mine - x.grad).abs().max().item())
    print(f"{name} at {world} ranks: max |grad diff| {worst:.1e}")


def test_siglip_ring_holds_only_local_blocks(spawned):
    """No tensor of the ring's forward or backward has more than b² elements (b: the local batch) and at
    no time are more than two b × b blocks and a few b × D feature blocks alive, while the gathered form
    builds the (W·b)² logit matrix."""
    world, tmp = spawned
    block, features = 4 * MEMORY_B**2, 4 * MEMORY_B * MEMORY_DIM  # bytes in fp32
    for r in results(tmp, world, "memory"):
        (ring_largest, ring_peak), (gathered_largest, gathered_peak) = (
            r["ring"].tolist(),
            r["gathered"].tolist(),
        )
        print(f"{world} ranks: largest tensor, peak bytes: ring {ring_largest}, {ring_peak}; ", end="")
        print(f"gathered {gathered_largest}, {gathered_peak}")
        assert 10 * features < block  # the bound below tells two logit blocks from three
        assert ring_largest <= MEMORY_B**2 and ring_peak <= 2 * block + 10 * features
        assert gathered_largest >= (world * MEMORY_B) ** 2 and gathered_peak >= world**2 * block


def test_every_declared_local_form_is_implemented():
    """The objective classes' `local_form` and train.local_losses agree: one implementation each."""
    declared = {cls for cls in OBJECTIVES.values() if getattr(cls, "local_form", None)}
    assert declared == set(LOCAL_FORMS)
    assert {OBJECTIVES[n].local_form for n in ("infonce", "multi_positive", "filip")} == {"rows"}
    assert OBJECTIVES["siglip"].local_form == "ring"


def test_local_loss_is_refused_for_an_objective_without_one():
    """One sentence naming the objective, those that have a local form, and the fix."""
    cfg = TrainConfig(batch_size=8, objective="lexlip", local_loss=True)
    with pytest.raises(UserError) as e:
        check_scaling(cfg, set(), Dist(0, 2))
    assert str(e.value) == (
        "train.local_loss needs an objective with a local form (infonce, siglip, sigmoid, filip, "
        "multi_positive) and 'lexlip' has none; unset train.local_loss or choose one of those."
    )
    check_scaling(TrainConfig(batch_size=8, objective="filip", local_loss=True), set(), Dist(0, 2))


def test_the_methods_table_says_which_objectives_have_a_local_form():
    """docs/methods.md's last column against the `local_form` each objective class with a row there
    declares (every objective but the `sigmoid` alias and `clip_refine`, documented on its own)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:-1] for line in doc.splitlines() if line.startswith("| `")]
    assert rows
    for cells in rows:
        name = cells[0].strip().split()[0].strip("`")
        declared = getattr(OBJECTIVES[name], "local_form", None)
        said = cells[-1].strip().split()[0]
        assert said == (declared or "—"), (name, said, declared)
