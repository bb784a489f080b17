import math

import torch
import torch.nn.functional as F

from lipkit.objectives import build_objective
from lipkit.objectives.infonce import InfoNCE


def naive_infonce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The formula written out with Python loops over pairs."""
    n = img.shape[0]
    i2t = t2i = 0.0
    for i in range(n):
        logits_i = [scale * torch.dot(img[i], txt[j]) for j in range(n)]
        i2t = i2t - (logits_i[i] - torch.logsumexp(torch.stack(logits_i), 0))
        logits_t = [scale * torch.dot(img[j], txt[i]) for j in range(n)]
        t2i = t2i - (logits_t[i] - torch.logsumexp(torch.stack(logits_t), 0))
    return 0.5 * (i2t + t2i) / n


def test_infonce_matches_naive_loop_with_gradients():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    fast = InfoNCE()(img, txt, t.exp())
    slow = naive_infonce(img, txt, t.exp())
    assert torch.allclose(fast, slow, atol=1e-10)
    g_fast = torch.autograd.grad(fast, (img, txt, t))
    g_slow = torch.autograd.grad(slow, (img, txt, t))
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, b, s: InfoNCE()(a, b, s.exp()), (img, txt, t))


def test_infonce_is_low_for_aligned_pairs_and_registered():
    x = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    loss = build_objective("infonce")
    aligned = loss(x, x, torch.tensor(50.0))
    shuffled = loss(x, x.roll(1, 0), torch.tensor(50.0))
    assert aligned < 0.1 < shuffled


def test_schedule_warmup_then_cosine():
    from lipkit.train.optim import lr_factor

    assert lr_factor(0, 0.0, 10, 0.1) == 0.1 and lr_factor(9, 0.0, 10, 0.1) == 1.0
    assert lr_factor(10, 0.0, 10, 0.1) == 1.0
    assert math.isclose(lr_factor(50, 0.5, 10, 0.1), 0.55)
    assert math.isclose(lr_factor(99, 1.0, 10, 0.1), 0.1) and math.isclose(lr_factor(99, 2.0, 10, 0.1), 0.1)
