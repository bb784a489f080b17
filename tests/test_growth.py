"""Model growth (models/growth.py, train/growth.py): the grown model computes the parent's embeddings
(fp32 1e-5, fp64 1e-10), the carried AdamW moments follow the gradients' map exactly, a run grows on
schedule with its optimizer state carried and resumes across a growth bit for bit, and what cannot grow
is refused in one sentence."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_MODEL
from lipkit.checkpoint import load_checkpoint
from lipkit.config import config_from_dict
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.growth import Growth, grow_model, grow_moment, layer_sources
from lipkit.models.presets import get_spec
from lipkit.train.growth import parse_schedule
from lipkit.train.launch import run_training
from test_resume import config, killed_and_resumed_objective_states

SPEC = dict(TINY_MODEL, vision_layers=2, text_layers=2, vocab_size=300, context_length=12)
GROWTHS = [Growth("both", 2, 2), Growth("image", 2, 0), Growth("text", 1, 3), Growth("both", 2, 0, noise=0.0)]


def model_and_inputs(dtype: torch.dtype, stem: str = "patch"):
    torch.manual_seed(0)
    model = DualEncoder(get_spec("tiny", **SPEC, vision_stem=stem)).to(dtype).eval()
    images = torch.randn(3, 3, 32, 32, dtype=dtype)
    ids = torch.randint(3, 300, (3, 12))
    ids[:, 9] = model.spec.eot_id
    return model, images, ids


def embeddings(model, images, ids):
    with torch.no_grad():
        return (*model.visual(images, return_tokens=True), *model.text(ids, return_tokens=True))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("stem", ["patch", "conv"])
@pytest.mark.parametrize("growth", GROWTHS, ids=str)
def test_grown_model_computes_the_parents_embeddings(dtype, tol, stem, growth):
    model, images, ids = model_and_inputs(dtype, stem)
    before = embeddings(model, images, ids)
    grow_model(model, growth, seed=0)
    after = embeddings(model, images, ids)
    for a, b in zip(before, after, strict=True):  # pooled and token features of both towers
        assert a.shape == b.shape and float((a - b).abs().max()) < tol
    spec = model.spec
    width = 2 if growth.width == 2 else 1
    if growth.grows("image"):
        assert (spec.vision_width, spec.vision_layers) == (32 * width, 2 + growth.depth)
        assert len(model.visual.transformer.resblocks) == spec.vision_layers
    if growth.grows("text"):
        assert (spec.text_width, spec.text_heads, spec.text_layers) == (
            32 * width,
            2 * width,
            2 + growth.depth,
        )


def test_inserted_blocks_are_spread_through_the_stack():
    assert layer_sources(4, 2) == [(0, False), (1, False), (1, True), (2, False), (2, True), (3, False)]
    assert layer_sources(2, 1) == [(0, False), (0, True), (1, False)]


def test_carried_moments_follow_the_gradients_map_exactly():
    """With E = 0 each grown parameter's gradient is the parent's, repeated and halved where its output is
    duplicated (the rule grow_moment applies to exp_avg): checked on every parameter, float64."""
    model, images, ids = model_and_inputs(torch.float64)
    model.train()

    def grads(m):
        m.zero_grad()
        loss = (m.visual(images) @ m.text(ids).t()).sin().sum() + m.visual(images, return_tokens=True)[1].pow(
            2
        ).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    old = grads(model)
    sources = grow_model(model, Growth("both", 2, 0, noise=0.0), seed=0)
    new = grads(model)
    checked = 0
    for name, g in new.items():
        src = sources[name]
        if src.old in old and (src.inputs or src.outputs):
            assert torch.allclose(g, grow_moment(old[src.old], src, 1), atol=1e-10, rtol=1e-8), name
            checked += 1
    assert checked > 20


def test_a_run_grows_on_schedule_and_carries_its_optimizer_state(table, tmp_path, monkeypatch):
    from lipkit.train import growth as growth_module

    seen = {}
    real = growth_module.grow_trainer

    def spy(trainer, g, step):
        seen["before"] = {
            n: trainer.opt.state[p]["exp_avg"].clone() for n, p in trainer.model.named_parameters()
        }
        real(trainer, g, step)
        states = {n: trainer.opt.state.get(p) for n, p in trainer.model.named_parameters()}
        seen["after"] = {n: st and {k: v.clone() for k, v in st.items()} for n, st in states.items()}
        seen["model"] = copy.deepcopy(trainer.model)

    monkeypatch.setattr("lipkit.train.trainer.grow_trainer", spy)
    grow = [{"at_step": 3, "towers": "both", "width": 2, "depth": 1}]
    run_training(config_from_dict(config(table, tmp_path / "run", epochs=1, grow=grow)))
    name = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert seen["after"][name]["exp_avg"].shape == (256, 64)
    assert torch.equal(seen["after"][name]["exp_avg"][:128, :32], seen["before"][name] / 2)
    assert seen["after"]["visual.transformer.resblocks.1.mlp.c_fc.weight"] is None  # inserted: no moments
    model, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert (model.spec.vision_width, model.spec.text_layers) == (64, 2)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"kind": "grow"' in lines


def test_a_run_killed_after_a_growth_resumes_bit_for_bit(table, tmp_path):
    """Grown at step 4 (width) and 10 (depth); SIGKILLed after step 9, resumed from step 8: the first
    growth is replayed on the fresh model, the second happens live, and the weights equal a straight run's."""
    grow = [{"at_step": 4, "towers": "both", "width": 2}, {"at_step": 10, "towers": "text", "depth": 1}]
    killed_and_resumed_objective_states(table, tmp_path, grow=grow)
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert weights["visual.proj"].shape[0] == 64 and "text.transformer.resblocks.1.ln_1.weight" in weights


def test_what_cannot_grow_is_refused(table, tmp_path):
    with pytest.raises(UserError, match="at_step"):
        parse_schedule([{"towers": "both", "width": 2}])
    with pytest.raises(UserError, match="distinct"):
        parse_schedule([{"at_step": 2, "width": 2}, {"at_step": 2, "depth": 1}])
    with pytest.raises(UserError, match="width 1 or 2"):
        grow_model(model_and_inputs(torch.float32)[0], Growth("both", 3, 0), seed=0)
    locked = config(
        table, tmp_path / "locked", grow=[{"at_step": 2, "towers": "text", "depth": 1}], lock_text="all"
    )
    with pytest.raises(UserError, match="locked"):
        run_training(config_from_dict(locked))


def test_growth_refusals_name_the_fix():
    spec = get_spec("micro", vocab_size=300, vision_width=96)  # conv stem: 16 → 24 channels, not a doubling
    with pytest.raises(UserError, match="16·2\\^k"):
        grow_model(DualEncoder(spec), Growth("image", 2, 0), seed=0)
    grow_model(
        DualEncoder(get_spec("micro", vocab_size=300, vision_width=128)), Growth("image", 2, 0), seed=0
    )
    for bad in ({"at_step": 2, "depth": "1"}, {"at_step": 2, "width": 2.0}, {"at_step": 2, "noise": -1.0}):
        with pytest.raises(UserError, match="integer at_step"):
            parse_schedule([bad])


def test_parameter_inheriting_with_momentum_blends_in_the_fresh_initialisation():
    import copy

    from lipkit.models.growth import grown_spec
    from lipkit.models.vision import VisionTransformer

    model, _, _ = model_and_inputs(torch.float64, "patch")
    grown = {}
    for lam in (1.0, 0.7, 0.0):
        m = copy.deepcopy(model)
        rng = torch.get_rng_state()
        grow_model(m, Growth("both", 2, 1, momentum=lam), seed=3)
        assert torch.equal(torch.get_rng_state(), rng)  # the fresh initialisation leaves the global RNG alone
        grown[lam] = dict(m.named_parameters())
    for name, p in grown[0.7].items():
        want = 0.7 * grown[1.0][name] + 0.3 * grown[0.0][name]
        assert torch.allclose(p, want, atol=1e-12), name
    torch.manual_seed(3)
    init = VisionTransformer(grown_spec(model.spec, Growth("both", 2, 1)))
    for name, p in init.named_parameters():  # λ = 0: the grown architecture's own seeded initialisation
        assert torch.allclose(grown[0.0]["visual." + name], p.double()), name
    assert not torch.equal(grown[0.7]["visual.proj"], grown[1.0]["visual.proj"])
    with pytest.raises(UserError, match="momentum in \\[0, 1\\]"):
        parse_schedule([{"at_step": 2, "momentum": 1.5}])
