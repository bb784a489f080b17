"""GRAM's gradient-regulating function (Li et al., 2023, "Gradient-Regulated Meta-Prompt Learning for
Generalizable Vision-Language Models").

GRAM meta-learns, beside a soft-prompt initialisation θ₀, a function ψ_φ that reshapes the gradient of a
few-shot task before the prompt steps along it, θ ← θ − α·ψ_φ(∇_θ L), so that the step keeps what
generalises across domains and damps what overfits the task. lipkit's ψ is an element-wise gate computed
from the whole gradient's direction:

    ψ_φ(g) = g ⊙ 2σ(U·(V·ĝ) + b)        ĝ = g / ‖g‖,  g flattened to P = M·width values

with V: r × P, U: P × r (rank r = 16) and b: P. U and b start at zero, so ψ starts as the identity
(2σ(0) = 1) and plain gradient descent; V is drawn from N(0, 1/P). Each gate lies in (0, 2): ψ can damp a
coordinate to nothing or double it, never flip its sign, so −ψ(g) stays a descent direction.

Not implemented: the paper's exact parameterisation of ψ (its text was not available offline; the gate
above is lipkit's choice, stated here and in docs/methods.md), and regulating anything but the context.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.errors import UserError


class GradientRegulator(nn.Module):
    def __init__(self, size: int, rank: int = 16) -> None:
        super().__init__()
        if size < 1 or rank < 1:
            raise UserError(
                f"A gradient regulator needs a size and rank of 1 or more, not {size} and {rank}."
            )
        self.size = size
        self.down = nn.Parameter(torch.randn(rank, size) / size**0.5)
        self.up = nn.Parameter(torch.zeros(size, rank))
        self.bias = nn.Parameter(torch.zeros(size))

    def gate(self, grad: torch.Tensor) -> torch.Tensor:
        """(P,) the gate 2σ(U·V·ĝ + b) of the flattened gradient."""
        flat = grad.reshape(-1).to(self.down.dtype)
        if flat.numel() != self.size:
            raise UserError(
                f"This gradient regulator was meta-trained for {self.size} prompt values, not {flat.numel()}; "
                "use a meta-training run with the same context length and text tower."
            )
        unit = flat / flat.norm().clamp_min(1e-12)
        return 2 * torch.sigmoid(self.up @ (self.down @ unit) + self.bias)

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        """ψ(g), shaped as g."""
        return (grad.reshape(-1) * self.gate(grad).to(grad.dtype)).reshape(grad.shape)


class RegulatedSGD(torch.optim.Optimizer):
    """θ ← θ − lr·ψ(∇θ) for one parameter (GRAM's regulated inner step, used to fine-tune on the shots)."""

    def __init__(self, param: torch.Tensor, regulator: GradientRegulator, lr: float) -> None:
        super().__init__([param], {"lr": lr})
        self.regulator = regulator

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 (the Optimizer interface)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * self.regulator(p.grad))
