"""What keeps a bf16 training step's peak memory down, pinned: the MLP's backward holds one 4·width
temporary at a time besides its pre-activation, with autograd's values bit for bit
(docs/benchmarks.md, "Issue 20: training memory")."""

from __future__ import annotations

import torch

from lipkit.models.transformer import Mlp
from live_tensors import LiveTensors


def mlp_step(mlp: Mlp, x: torch.Tensor, plain: bool) -> list[torch.Tensor]:
    """Gradients of x and the MLP's parameters, through lipkit's MLP or plain autograd, in bf16 autocast."""
    x = x.detach().requires_grad_()
    mlp.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp.c_proj(mlp.gelu(mlp.c_fc(x))) if plain else mlp(x)
    y.float().square().sum().backward()
    return [x.grad, *(p.grad for p in mlp.parameters())]


def test_mlp_backward_is_autograds_bit_for_bit_in_bf16():
    torch.manual_seed(3)
    mlp = Mlp(32, 128, False)
    x = torch.randn(4, 7, 32)
    ours, plain = mlp_step(mlp, x, plain=False), mlp_step(mlp, x, plain=True)
    for a, b in zip(ours, plain, strict=True):
        assert torch.equal(a, b)


def test_mlp_backward_holds_one_hidden_sized_temporary_at_a_time():
    """Live bytes of the tensors the backward creates: ∂L/∂h (returned) and one temporary of the hidden
    size (act(h), then g·W, which becomes ∂L/∂h in place) — not act′(h) ⊙ (g W) next to g W as well."""
    torch.manual_seed(4)
    tokens, width, hidden = 512, 16, 256  # a wide hidden layer: the width-sized tensors count little
    mlp = Mlp(width, hidden, False)
    x = torch.randn(1, tokens, width, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    loss = y.float().square().sum()
    with LiveTensors() as mode:
        loss.backward()
    hidden_bytes = tokens * hidden * 2  # one bf16 tensor of the hidden size
    assert mode.peak < 1.5 * hidden_bytes, (mode.peak, hidden_bytes)  # 1.19 here; 2.09 before
