"""The conv stem normalises with GroupNorm (no batch statistics): an image's embedding does not depend on
its batch, gradient caching equals the plain step, and BatchNorm stems of old checkpoints still load
exactly but are refused where batch statistics would differ (several ranks, gradient caching). A locked
tower keeps its statistics and weights frozen while the rest trains."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.config import AugmentConfig, TrainConfig
from lipkit.errors import UserError
from lipkit.models.batch_stats import batch_statistics_modules
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import ModelSpec, get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.distributed import Dist
from lipkit.train.trainer import Trainer
from tiny_batch import BATCH, WORDS, batch
from tiny_batch import SPEC as TINY_SPEC

SPEC = {**TINY_SPEC, "vision_stem": "conv"}  # the demo's image tower shape, scaled down: 32 px, 8 px patches


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(WORDS * 3, vocab_size=300, context_length=12)


def model_of(tok: TextTokenizer, **spec) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(get_spec("tiny", **{**SPEC, **spec}, vocab_size=tok.vocab_size, eot_id=tok.eot_id))


def trainer_of(model: DualEncoder, tok, tmp: Path, per_image: int = 1, world: int = 1, **train) -> Trainer:
    cfg = TrainConfig(batch_size=BATCH, **{"grad_clip": 0.0, **train})
    return Trainer(
        model,
        build_objective(cfg.objective, **cfg.objective_args),
        tok,
        cfg,
        AugmentConfig(),
        tmp,
        torch.device("cpu"),
        captions_per_image=per_image,
        dist=Dist(0, world),
    )


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message


def test_conv_stem_embeds_each_image_independently_of_its_batch(tok):
    """GroupNorm normalises each image on its own: in train mode (where BatchNorm used the batch's
    statistics) an image's embedding is the one it gets alone — a naive loop over single images — so
    ranks holding different parts of a batch compute what one process computes."""
    model = model_of(tok).train()
    images = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        together = model.encode_image(images)
        alone = torch.cat([model.encode_image(images[i : i + 1]) for i in range(BATCH)])
        halves = torch.cat([model.encode_image(images[:3]), model.encode_image(images[3:])])
    assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()
    assert torch.allclose(together, halves, atol=1e-5)
    norms = [m for m in model.visual.conv1 if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(1, 16), (1, 16), (1, 32)]  # one group
    assert batch_statistics_modules(model) == []


def step_result(model: DualEncoder, tok, tmp: Path, per_image: int, **train) -> dict[str, torch.Tensor]:
    trainer = trainer_of(model, tok, tmp, per_image, **train)
    images, captions = batch(per_image)
    loss, finite = trainer.step(images, captions, lr=1e-3)
    assert finite
    out = {"loss": loss.reshape(1)}
    out.update({f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    out.update({f"param.{n}": p.detach().clone() for n, p in model.named_parameters()})
    out.update({f"buffer.{n}": b.clone() for n, b in model.named_buffers()})
    return out


@pytest.mark.parametrize("objective,per_image", [("infonce", 1), ("multi_positive", 3)])
def test_gradient_caching_equals_the_plain_step_with_the_conv_stem(tmp_path, tok, objective, per_image):
    """The demo's image tower (conv stem) and objective: the chunks 3, 3, 2 of gradient caching give the
    plain step's loss, gradients and weights (with BatchNorm each chunk had its own statistics)."""
    plain = step_result(model_of(tok), tok, tmp_path, per_image, objective=objective)
    cached = step_result(model_of(tok), tok, tmp_path, per_image, objective=objective, grad_cache_chunk=3)
    assert plain.keys() == cached.keys() and sum(k.startswith("grad.visual.conv1.") for k in plain) == 11
    for k in plain:
        a, b = plain[k], cached[k]
        if k.startswith("param."):
            # AdamW's first step moves a weight by ~lr·sign(g): weights are compared to a tenth of a step,
            # where the gradient is above rounding noise (the attention key bias's true gradient is 0: a
            # softmax ignores a shift, and Adam would blow its ±1e-9 noise up to a whole ±lr step)
            g = plain.get("grad." + k.removeprefix("param."))
            if g is not None:
                a, b = a[g.abs() > 1e-6], b[g.abs() > 1e-6]
        tol = 1e-4 if k.startswith("param.") else 1e-5
        assert torch.allclose(a, b, atol=tol), (k, (a - b).abs().max().item())


@pytest.mark.parametrize("train", [{"grad_cache_chunk": 3}, {"world": 2}])
def test_a_batch_norm_stem_is_refused_where_statistics_would_differ(tmp_path, tok, train):
    """An old checkpoint's BatchNorm stem (stem_norm='batch') would normalise each rank's or chunk's part
    of the batch on its own: one sentence that names the layers and the fix."""
    model = model_of(tok, stem_norm="batch")
    assert batch_statistics_modules(model) == ["visual.conv1.1", "visual.conv1.4", "visual.conv1.7"]
    world = train.pop("world", 1)
    with pytest.raises(UserError, match=r"batch statistics \(BatchNorm in visual\.conv1\.1") as e:
        trainer_of(model, tok, tmp_path, world=world, **train)
    assert one_sentence(str(e.value)) and "train.grad_cache_chunk" in str(e.value)
    assert model.training  # the check left the model's mode as it was
    # allowed: one process without caching, a chunk as large as the batch, a locked image tower
    trainer_of(model_of(tok, stem_norm="batch"), tok, tmp_path)
    trainer_of(model_of(tok, stem_norm="batch"), tok, tmp_path, grad_cache_chunk=BATCH)
    locked = model_of(tok, stem_norm="batch")
    locked.lock("image", "backbone")
    trainer_of(locked, tok, tmp_path, world=world, **train)


def fit_five_steps(model: DualEncoder, tok, tmp: Path) -> None:
    trainer = trainer_of(model, tok, tmp, lr=1e-2, warmup_steps=0, epochs=1)

    def batches(epoch: int, start: int):
        for i in range(start, 5):
            yield (*batch(seed=10 + i), [f"k{i}"] * BATCH)

    result = trainer.fit(batches, steps_per_epoch=5)
    assert result.steps == 5 and result.faults == 0


@pytest.mark.parametrize("mode", ["all", "backbone"])
def test_a_locked_tower_keeps_its_running_statistics_and_weights(tmp_path, tok, mode):
    """LiT on a BatchNorm stem (stem_norm='batch', so running statistics exist): five steps of the training
    loop leave the locked tower's weights and running statistics exactly as they were (a locked tower in
    train mode used batch statistics and moved its running ones)."""
    model = model_of(tok, stem_norm="batch")
    model.lock("image", mode)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    fit_five_steps(model, tok, tmp_path)
    after = model.visual.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == ([] if mode == "all" else ["proj"])  # only a backbone lock's projection trains
    assert int(after["conv1.1.num_batches_tracked"]) == 0
    assert any(not torch.equal(v, model.text.state_dict()[k]) for k, v in text_before.items())  # it trained
    model.train()  # what the loop does: the locked part stays in eval mode, the rest trains
    assert not model.visual.conv1.training and not model.visual.transformer.training
    assert model.visual.training == (mode == "backbone") and model.text.training
    model.visual.requires_grad_(True)  # unlocked again: it trains again
    model.train()
    assert model.visual.conv1[1].training


def test_an_unlocked_batch_norm_stem_moves_its_statistics(tmp_path, tok):
    """The control for the test above: the same five steps unlocked do move the running statistics."""
    model = model_of(tok, stem_norm="batch")
    before = model.visual.conv1[1].running_mean.clone()
    fit_five_steps(model, tok, tmp_path)
    assert int(model.visual.conv1[1].num_batches_tracked) == 5
    assert not torch.equal(before, model.visual.conv1[1].running_mean)


def test_an_old_checkpoint_loads_with_its_batch_norm_and_identical_embeddings(tmp_path, tok):
    """A checkpoint saved before `stem_norm` existed (a BatchNorm stem, no such key in config.json) loads
    as stem_norm='batch' with its running statistics; new checkpoints record 'group'."""
    model = model_of(tok, stem_norm="batch")
    model.train()(torch.randn(4, 3, 32, 32), tok(["a", "b", "c", "d"]))  # the running statistics move
    model.eval()
    save_checkpoint(tmp_path / "old", model, tok)
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    del config["model"]["stem_norm"]
    config_path.write_text(json.dumps(config))
    old, tok2, _ = load_checkpoint(tmp_path / "old")
    assert old.spec.stem_norm == "batch" and isinstance(old.visual.conv1[1], nn.BatchNorm2d)
    assert torch.equal(old.visual.conv1[1].running_var, model.visual.conv1[1].running_var)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), old.encode_image(images))
    save_checkpoint(tmp_path / "new", model_of(tok), tok)
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model"]["stem_norm"] == "group"
    assert load_checkpoint(tmp_path / "new")[0].spec.stem_norm == "group"


def test_new_specs_use_group_norm_and_a_wrong_stem_norm_is_one_sentence(tok):
    assert get_spec("tiny").stem_norm == "group"
    assert ModelSpec.from_dict(get_spec("tiny").to_dict()).stem_norm == "group"
    with pytest.raises(UserError, match="stem_norm must be 'group' or 'batch'") as e:
        model_of(tok, stem_norm="layer")
    assert one_sentence(str(e.value))
