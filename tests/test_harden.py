"""Adversarial fine-tuning (lipkit.attack.harden, `lipkit harden`): FARE's loss against its formula, one step
of the loop against a hand-written step, what trains and what does not, the trained tower being harder to
move, and the command end to end with its refusals."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from lipkit.errors import UserError


def _tiny(table, n=12):
    from conftest import tiny_eval_setup

    records, tok, model = tiny_eval_setup(table, n=n)
    return records, tok, model.requires_grad_(False)


def _store(records, model):
    from lipkit.data.image_store import ImageStore

    return ImageStore(records, model.spec.image_size, cache=True, desc="test")


def test_fare_loss_is_the_squared_distance_to_the_frozen_embedding(table):
    from lipkit.attack.harden import fare_loss

    _, _, model = _tiny(table)
    model = model.double()
    torch.manual_seed(0)
    x = torch.rand(3, 3, model.spec.image_size, model.spec.image_size, dtype=torch.float64)
    reference = torch.randn(3, model.spec.embed_dim, dtype=torch.float64)
    mean = torch.tensor(model.spec.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(model.spec.image_std, dtype=torch.float64).view(3, 1, 1)
    got = fare_loss(model, reference)(x)
    for i in range(3):  # not normalised: the tower's pooled embedding itself
        phi = model.visual(((x[i] - mean) / std)[None])[0]
        assert torch.allclose(got[i], ((phi - reference[i]) ** 2).sum(), atol=1e-10)


def test_one_step_is_pgd_on_the_current_weights_then_adamw_on_the_image_tower(table):
    from lipkit.attack.harden import HardenSettings, fine_tune
    from lipkit.attack.pgd import embeddings, pgd
    from lipkit.data.image_store import epoch_batches

    records, _, model = _tiny(table)
    store = _store(records, model)
    s = HardenSettings(method="fare", steps=1, batch_size=4, eps=8 / 255, attack_steps=2, lr=1e-2)
    by_hand = copy.deepcopy(model)
    fine_tune(model, store, s)
    x = (
        store.get(
            epoch_batches(len(store.records), 1, 4, torch.Generator().manual_seed(s.seed))[0].tolist()
        ).float()
        / 255
    )
    with torch.no_grad():
        reference = embeddings(by_hand, x)
    loss = lambda z: (embeddings(by_hand, z) - reference).pow(2).sum(1)  # noqa: E731
    adversarial = pgd(loss, x, s.eps, 2, s.step_size, "linf", torch.Generator().manual_seed(s.seed))
    by_hand.visual.requires_grad_(True)
    opt = torch.optim.AdamW(by_hand.visual.parameters(), lr=1e-2, weight_decay=s.weight_decay)
    loss(adversarial).mean().backward()
    opt.step()
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.visual.parameters(), _tiny(table)[2].visual.parameters(), strict=True)
    )


def test_fare_makes_the_tower_harder_to_move_and_trains_nothing_else(table):
    from lipkit.attack.harden import HardenSettings, fare_loss, fine_tune
    from lipkit.attack.pgd import embeddings, pgd

    records, _, model = _tiny(table, n=24)
    store = _store(records, model)
    before = copy.deepcopy(model)
    s = HardenSettings(method="fare", steps=40, batch_size=8, eps=16 / 255, attack_steps=3, lr=3e-3)
    trained = fine_tune(model, store, s)
    assert trained["trainable_parameters"] == sum(p.numel() for p in model.visual.parameters())
    for (name, a), b in zip(model.state_dict().items(), before.state_dict().values(), strict=True):
        if not name.startswith("visual."):
            assert torch.equal(a, b), name  # the text tower and the logit scale stay
    x = store.get(range(len(store.records))).float() / 255

    def worst(m):  # the attacked distance of each image from the original embedding of its clean self
        with torch.no_grad():
            reference = embeddings(before, x)
        loss = fare_loss(m, reference)
        adversarial = pgd(loss, x, s.eps, 10, s.step_size, "linf", torch.Generator().manual_seed(9))
        with torch.no_grad():
            return loss(adversarial).mean()

    assert worst(model) < 0.5 * worst(before)


def _harden(args):
    from lipkit.cli import app

    return CliRunner().invoke(app, ["harden", *map(str, args)])


def test_the_cli_saves_a_checkpoint_that_loads_and_refuses_in_one_sentence(table, tmp_path):
    from lipkit.checkpoint import load_checkpoint, save_checkpoint

    _, tok, model = _tiny(table)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    quick = ["--steps", "2", "--batch-size", "4", "--attack-steps", "1"]
    for method in ("fare", "tecoa"):
        r = _harden([tmp_path / "ckpt", tmp_path / method, "--data", table, "--method", method, *quick])
        assert r.exit_code == 0, r.output + repr(r.exception)
        shown = json.loads(next(line for line in r.output.splitlines() if line.startswith("{")))
        assert shown["method"] == method and shown["loss_last_step"]["step"] == 2
        hardened, _, info = load_checkpoint(tmp_path / method / "checkpoint")
        assert info["adapted"]["method"] == method and info["adapted"]["eps"] == pytest.approx(2 / 255)
        assert ("column" in info["adapted"]) == (method == "tecoa")
    again = _harden([tmp_path / "ckpt", tmp_path / "fare2", "--data", table, "--method", "fare", *quick])
    assert again.exit_code == 0
    a = load_checkpoint(tmp_path / "fare" / "checkpoint")[0].state_dict()
    b = load_checkpoint(tmp_path / "fare2" / "checkpoint")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # one seed, one result
    for args, needle in (
        (["--method", "trades"], "--method must be one of"),
        (["--eps", "0"], "--eps must be in (0, 1]"),
        (["--method", "tecoa", "--column", "nope"], "Column 'nope'"),
    ):
        r = _harden([tmp_path / "ckpt", tmp_path / "x", "--data", table, *quick, *args])
        assert r.exit_code != 0 and isinstance(r.exception, UserError), r.output
        assert needle in str(r.exception)
    r = _harden([tmp_path / "ckpt", tmp_path / "fare", "--data", table, "--method", "fare", *quick])
    assert isinstance(r.exception, UserError) and "--overwrite" in str(r.exception)
