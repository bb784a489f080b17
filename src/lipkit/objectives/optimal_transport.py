"""Word–patch alignment by optimal transport (UNITER's WRA, Chen et al., 2020, §3.2), solved by IPOT (Xie et
al., 2019, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance"), as UNITER does.

For one (image, caption) pair with the caption's real token features y_1..y_M and the image's token features
x_1..x_N (L2-normalised), the cost C_ij = 1 − <y_i, x_j> and uniform marginals a = 1/M, b = 1/N, the
Wasserstein distance is

    D(caption, image) = min_{T ≥ 0, T 1 = a, Tᵀ1 = b} <C, T>.

IPOT approximates the optimal plan by proximal-point steps, each a Sinkhorn scaling of G = exp(−C/β) ⊙ T:

    T⁰ = 1;   repeat t times:  Q = G ⊙ Tᵗ;  (k times: v = b / (Qᵀ u),  u = a / (Q v));  Tᵗ⁺¹ = diag(u) Q diag(v)

with u⁰ = a. Unlike plain Sinkhorn it converges to the exact (unregularised) distance as t grows, for any β.
The plan is computed without gradient and the distance D = <C, T> differentiates through C only
(UNITER: β = 0.5, t = 50, k = 1).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def ipot_plan(
    cost: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner: int = 1,
) -> torch.Tensor:
    """(P, M, N) costs and the (P, M) / (P, N) real rows and columns → (P, M, N) transport plans, zero on
    padding, with row sums 1/|rows| (the last scaling's, exact) and column sums → 1/|cols| as the
    iterations grow."""
    real = rows[:, :, None] & cols[:, None, :]
    a = rows.to(cost.dtype) / rows.sum(1, keepdim=True).clamp(min=1)
    b = cols.to(cost.dtype) / cols.sum(1, keepdim=True).clamp(min=1)
    kernel = torch.exp(-cost / beta) * real
    plan = real.to(cost.dtype)
    u = a.clone()
    tiny = torch.finfo(cost.dtype).tiny
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner):
            v = torch.where(cols, b / (q.transpose(1, 2) @ u[..., None])[..., 0].clamp(min=tiny), 0.0)
            u = torch.where(rows, a / (q @ v[..., None])[..., 0].clamp(min=tiny), 0.0)
        plan = u[:, :, None] * q * v[:, None, :]
    return plan


def ot_distance(
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
) -> torch.Tensor:
    """(P, M, D) caption tokens with their (P, M) mask and (P, N, D) image tokens, all L2-normalised → (P,)
    word–patch Wasserstein distances <C, T>, T by IPOT (no gradient through the plan)."""
    cost = 1 - text_tokens @ image_tokens.transpose(1, 2)
    rows = text_mask.bool()
    cols = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
    plan = ipot_plan(cost.detach(), rows, cols, beta, iterations)
    return (cost * plan).sum((1, 2))
