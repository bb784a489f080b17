"""RS-M-CLIP's self-distillation (DINO's loss between an EMA teacher's global views and the student's global
views and local crops) against a naive per-pair loop (float64, values and gradients, the head included),
its centre and EMA updates and neutral settings; the local crops the trainer draws; training end to end is
in tests/test_objectives_training.py and two ranks against one process in tests/test_distributed.py."""

import pytest
import torch

from conftest import TINY_MODEL
from lipkit.config import AugmentConfig
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.self_distill import LocalGlobalDistillation
from lipkit.train.views import ViewMaker
from test_objectives import assert_same_value_and_grads, log_scale, unit

B, D, L = 3, 6, 2


def naive_self_distill(obj, students, teachers):
    heads_s = [obj.student_head(x) / obj.student_temperature for x in students]
    with torch.no_grad():
        heads_t = [(obj.teacher_head(x) - obj.center) / obj.teacher_temperature for x in teachers]
    total, pairs = 0.0, 0
    for g, zt in enumerate(heads_t):
        for v, zs in enumerate(heads_s):
            if v == g:
                continue
            term = 0.0
            for i in range(B):
                q = torch.softmax(zt[i], 0)
                logp = zs[i] - torch.logsumexp(zs[i], 0)
                term = term - sum(q[k] * logp[k] for k in range(q.shape[0]))
            total, pairs = total + term / B, pairs + 1
    return total / pairs


def _objective(**args):
    obj = LocalGlobalDistillation(local_crops=L, prototypes=5, hidden=7, bottleneck=4, **args)
    obj._heads(D, torch.device("cpu"))
    obj.double()
    with torch.no_grad():
        obj.teacher_head.mlp[0].weight.add_(0.05)  # a teacher that differs from the student
        obj.center.copy_(torch.linspace(-0.1, 0.1, 5, dtype=torch.float64))
    return obj


@pytest.mark.parametrize("both", [True, False])
def test_self_distillation_matches_naive_loop(both):
    x1, x2, y, t = unit(B, D, seed=960), unit(B, D, seed=961), unit(B, D, seed=962), log_scale()
    local = unit(B * L, D, seed=963)
    xm1, xm2 = unit(B, D, seed=964).detach(), unit(B, D, seed=965).detach()
    obj = _objective(distill_weight=0.7, contrast_both_views=both)
    center = obj.center.clone()
    fast = obj(x1, y, t.exp(), x2, local, xm1, xm2)
    crops = [local.reshape(B, L, D)[:, c] for c in range(L)]
    obj.center.copy_(center)  # the naive loop reads the centre before this step's update
    clip = InfoNCE()(x1, y, t.exp())
    if both:
        clip = 0.5 * (clip + InfoNCE()(x2, y, t.exp()))
    slow = clip + 0.7 * naive_self_distill(obj, [x1, x2, *crops], [xm1, xm2])
    head = list(obj.student_head.parameters())
    assert_same_value_and_grads(fast, slow, (x1, x2, local, y, t, *head))


def test_centre_ema_and_neutral_settings():
    x1, x2, y, t = unit(B, D, seed=970), unit(B, D, seed=971), unit(B, D, seed=972), log_scale()
    local = unit(B * L, D, seed=973)
    xm1, xm2 = unit(B, D, seed=974).detach(), unit(B, D, seed=975).detach()
    obj = _objective(center_momentum=0.9)
    before = obj.center.clone()
    obj(x1, y, t.exp(), x2, local, xm1, xm2)
    assert torch.equal(obj.center, before)  # the centre moves after the optimiser step, not before
    obj.after_step(None)
    with torch.no_grad():
        mean = torch.cat([obj.teacher_head(xm1), obj.teacher_head(xm2)]).mean(0)
    assert torch.allclose(obj.center, 0.9 * before + 0.1 * mean, atol=1e-12)
    off = LocalGlobalDistillation(distill_weight=0, contrast_both_views=False)
    assert_same_value_and_grads(
        off(x1, y, t.exp(), x2, local, xm1, xm2), InfoNCE()(x1, y, t.exp()), (x1, y, t)
    )
    for bad in (
        {"local_scale": [0.5, 0.2]},
        {"local_crops": 0},
        {"momentum": 1.0},
        {"contrast_both_views": 1},
    ):
        with pytest.raises(UserError, match="Objective 'rs_m_clip'"):
            build_objective("rs_m_clip", **bad)


def test_teacher_follows_the_ema_of_model_and_head():
    torch.manual_seed(0)
    model = DualEncoder(get_spec("tiny", **TINY_MODEL, vocab_size=50))
    obj = LocalGlobalDistillation(momentum=0.8, prototypes=16)
    teacher = obj.bind_model(model)
    assert obj.student_head is not None and not any(p.requires_grad for p in obj.teacher_head.parameters())
    before = [p.detach().clone() for p in obj.teacher_head.parameters()]
    with torch.no_grad():
        for p in [*model.parameters(), *obj.student_head.parameters()]:
            p.add_(1.0)
    obj.after_step(model)
    for old, new, theta in zip(
        before, obj.teacher_head.parameters(), obj.student_head.parameters(), strict=True
    ):
        assert torch.allclose(new, 0.8 * old + 0.2 * theta, atol=1e-6)
    first = next(teacher.parameters())
    assert torch.allclose(first, next(model.parameters()) - 0.8, atol=1e-6)


def test_local_crops_have_their_shape_and_are_drawn_like_one_process():
    spec = get_spec("tiny", **TINY_MODEL, vocab_size=50)
    images = torch.randint(0, 255, (4, 3, spec.image_size, spec.image_size), dtype=torch.uint8)

    def draw(window, rows):
        maker = ViewMaker(
            spec, AugmentConfig(), torch.Generator().manual_seed(3), torch.device("cpu"), window
        )
        maker.view(images[rows])
        return maker.views(images[rows], True, 2, (0.05, 0.4))

    whole = draw(None, slice(None))
    assert whole.local.shape == (4, 2, 3, spec.image_size, spec.image_size)
    halves = [draw((0, 4), slice(0, 2)), draw((2, 4), slice(2, 4))]  # two ranks' windows
    assert torch.equal(torch.cat([h.local for h in halves]), whole.local)
    assert torch.equal(torch.cat([h.second for h in halves]), whole.second)
    assert whole[slice(1, 3)].local.shape[0] == 2


@pytest.mark.parametrize(
    "objective, args, tokens",
    [
        ("improved_baselines", {"image_ssl": "byol"}, False),
        ("rs_m_clip", {"local_crops": 1}, False),
        ("tcl_momentum", {"local_weight": 0.0}, False),
        ("tcl_momentum", {}, True),
    ],
)
def test_the_momentum_model_returns_tokens_only_when_they_are_read(objective, args, tokens):
    """A timm tower whose tokens are not in the projection's space refuses token reads: an objective
    that reads none must never ask the momentum model for them."""
    import copy

    from lipkit.train.inputs import objective_inputs, objective_needs
    from lipkit.train.views import Views

    torch.manual_seed(0)
    model = DualEncoder(get_spec("tiny", **TINY_MODEL, vocab_size=50))
    teacher, asked = copy.deepcopy(model), []
    for name in ("visual", "text"):
        tower = getattr(teacher, name)
        tower.forward = lambda x, return_tokens=False, _f=tower.forward: (
            asked.append(return_tokens) or _f(x, return_tokens=return_tokens)
        )
    size = model.spec.image_size
    images = torch.randn(4, 3, size, size)
    ids = torch.randint(1, 49, (4, 8))
    needs = objective_needs(build_objective(objective, **args))
    views = Views(second=images, local=images[:, None])
    out = objective_inputs(model, needs, images, ids, 1, views, 0, teacher)
    assert asked, "the momentum model ran"
    assert any(asked) if tokens else not any(asked)
    assert set(out) == needs
