"""TCL with momentum encoders and queues against a naive per-pair loop (float64, values and gradients), its
EMA update and first-in-first-out queues, the global-to-local term's masking and pooling, and the refusal
under FSDP; training end to end is in tests/test_objectives_training.py and two ranks against one process
(the EMA model and the queues included) in tests/test_distributed.py."""

import pytest
import torch

from conftest import TINY_MODEL
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.objectives.tcl_momentum import MomentumTripleContrast, global_local_loss, pool_grid
from test_objectives import TOL, assert_same_value_and_grads, log_scale, unit

F64 = torch.float64


def naive_ce(logits, target):
    return -sum(target[j] * (logits[j] - torch.logsumexp(logits, 0)) for j in range(len(logits)))


def naive_g2l(local, anchor, t, mask):
    n, k = local.shape[:2]
    total = 0.0
    for i in range(n):
        valid = [kk for kk in range(k) if mask[i, kk]]
        neg = [
            t * torch.dot(anchor[i], local[j, kk])
            for j in range(n)
            if j != i
            for kk in range(k)
            if mask[j, kk]
        ]
        per = 0.0
        for kk in valid:
            pos = t * torch.dot(anchor[i], local[i, kk])
            per = per - (pos - torch.logsumexp(torch.stack([pos, *neg]), 0))
        total = total + per / len(valid)
    return total / n


def naive_tcl(x, y, t, xm, ym, xl, yl, mask, qi, qt, alpha, weight):
    n = x.shape[0]
    all_i, all_t = torch.cat([xm, qi]), torch.cat([ym, qt])
    m = all_i.shape[0]
    total = 0.0
    for i in range(n):
        e = [1.0 if j == i else 0.0 for j in range(m)]
        with torch.no_grad():
            soft_t = torch.softmax(torch.stack([t * torch.dot(xm[i], all_t[j]) for j in range(m)]), 0)
            soft_i = torch.softmax(torch.stack([t * torch.dot(ym[i], all_i[j]) for j in range(m)]), 0)
        target_t = [alpha * soft_t[j] + (1 - alpha) * e[j] for j in range(m)]
        target_i = [alpha * soft_i[j] + (1 - alpha) * e[j] for j in range(m)]
        x_t = torch.stack([t * torch.dot(x[i], all_t[j]) for j in range(m)])
        y_i = torch.stack([t * torch.dot(y[i], all_i[j]) for j in range(m)])
        x_i = torch.stack([t * torch.dot(x[i], all_i[j]) for j in range(m)])
        y_t = torch.stack([t * torch.dot(y[i], all_t[j]) for j in range(m)])
        total = (
            total + naive_ce(x_t, target_t) + naive_ce(y_i, target_i) + naive_ce(x_i, e) + naive_ce(y_t, e)
        )
    loss = total / n
    if weight:
        ones = torch.ones(xl.shape[:2], dtype=torch.bool)
        loss = loss + weight * (naive_g2l(xl, x, t, ones) + naive_g2l(yl, y, t, mask))
    return loss / 6


@pytest.mark.parametrize("queue, alpha, weight", [(0, 0.0, 0.0), (3, 0.4, 1.0), (5, 1.0, 0.5)])
def test_tcl_momentum_matches_naive_loop(queue, alpha, weight):
    x, y, t = unit(4, 6, seed=940), unit(4, 6, seed=941), log_scale()
    xm, ym = unit(4, 6, seed=942).detach(), unit(4, 6, seed=943).detach()
    xl, yl = unit(4, 3, 6, seed=944).detach(), unit(4, 5, 6, seed=945).detach()
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    qi, qt = unit(queue, 6, seed=946).detach(), unit(queue, 6, seed=947).detach()
    loss = MomentumTripleContrast(queue_size=queue, distill_alpha=alpha, local_weight=weight)
    loss.register_buffer("image_queue", qi.clone())
    loss.register_buffer("text_queue", qt.clone())
    loss.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
    fast = loss(x, y, t.exp(), xm, ym, xl, yl, mask)
    assert torch.equal(loss.image_queue, qi)  # the queues move after the optimiser step, not before
    loss.after_step(None)
    slow = naive_tcl(x, y, t.exp(), xm, ym, xl, yl, mask, qi, qt, alpha, weight)
    assert_same_value_and_grads(fast, slow, (x, y, t))
    if queue:  # the batch's momentum features entered the queue, oldest rows first, wrapping
        rows = [(i % queue) for i in range(min(4, queue))]
        assert (
            torch.equal(loss.image_queue[rows], xm[-len(rows) :])
            and int(loss.queue_ptr) == min(4, queue) % queue
        )


def test_global_local_term_pooling_and_gradcheck():
    local, anchor = unit(3, 4, 5, seed=950), unit(3, 5, seed=951)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    t = torch.tensor(3.0, dtype=F64)
    assert abs(global_local_loss(local, anchor, t, mask) - naive_g2l(local, anchor, t, mask)) < TOL
    assert torch.autograd.gradcheck(lambda a, b: global_local_loss(a, b, t, mask), (local, anchor))
    grid = torch.arange(2 * 16 * 1, dtype=F64).reshape(2, 16, 1)  # a 4×4 grid → 2×2 block means
    assert pool_grid(grid, 2)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_grid(grid, 4) is grid and pool_grid(grid[:, :15], 2).shape == (2, 15, 1)


def test_momentum_model_follows_the_ema_and_fsdp_is_refused():
    torch.manual_seed(0)
    model = DualEncoder(get_spec("tiny", **TINY_MODEL, vocab_size=50))
    objective = MomentumTripleContrast(momentum=0.9, queue_size=8)
    ema = objective.bind_model(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters(), strict=True))
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    assert objective.image_queue.shape == (8, TINY_MODEL["embed_dim"])
    before = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    objective.after_step(model)
    for old, new, theta in zip(before, ema.parameters(), model.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * theta, atol=1e-6)
    assert any(k.startswith("momentum_model.") for k in objective.state_dict())  # saved with the state
    for bad in ({"momentum": 1.0}, {"queue_size": -1}, {"distill_alpha": 2}, {"local_grid": 0}):
        with pytest.raises(UserError, match="Objective 'tcl_momentum'"):
            build_objective("tcl_momentum", **bad)
    from lipkit.config import TrainConfig
    from lipkit.train.distributed import Dist, check_scaling
    from lipkit.train.inputs import objective_needs

    cfg = TrainConfig(objective="tcl_momentum", strategy="fsdp", batch_size=8)
    with pytest.raises(UserError, match="momentum copy of the model, which train.strategy=fsdp"):
        check_scaling(cfg, objective_needs(objective), Dist(0, 2))
