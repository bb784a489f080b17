"""Pre-norm transformer blocks shared by both towers.

Parameter names follow OpenCLIP (`ln_1`, `attn.in_proj_weight`, `attn.out_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`) so that converting checkpoints is a rename, not a rewrite. Attention runs
through `torch.nn.functional.scaled_dot_product_attention` (fused kernels), except on a CPU in bf16,
where the written-out form is 3–6× faster (`explicit_attention`). The MLP keeps only its
pre-activation for the backward (`ActivationProjection`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the original OpenAI CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation("quick_gelu", x)


def activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    """act(x) for kind "gelu" (exact, erf) or "quick_gelu", functional (no module hooks)."""
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


def activation_backward(kind: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∂L/∂x of y = act(x) given ∂L/∂y, without building a graph (safe inside a backward). May write the
    result over `grad` (exact GELU does: one buffer fewer); use the returned tensor."""
    if kind == "quick_gelu":  # d/dx [x σ(1.702 x)] = σ (1 + 1.702 x (1 − σ))
        s = torch.sigmoid(1.702 * x)
        return grad * s * (1 + 1.702 * x * (1 - s))
    return torch.ops.aten.gelu_backward.grad_input(grad, x, grad_input=grad)  # elementwise: in place is safe


def explicit_attention(
    qkv: torch.Tensor, heads: int, causal: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / √d_head + M) v for packed (batch, tokens, 3·width) projections → (batch, tokens, width).

    M = −∞ above the diagonal when causal, else 0; or −∞ where the (batch, 1, tokens, tokens) boolean `mask`
    is false. Written out as two batched matmuls (the scale and
    the mask folded into the first, `baddbmm`) and a softmax. Used on a CPU in bf16, where PyTorch's
    fused kernels are slow: the flash kernel's bf16 backward, and the math kernel, which upcasts
    q, k, v to fp32. Per tiny-preset vision layer (batch 128) on 2 cores, forward+backward: flash 62,
    math 27, this 10 ms; inference: flash 11, this 3.2 ms. Precision: the scores and probabilities
    are bf16 tensors (the softmax accumulates in fp32), as in any unfused attention under autocast;
    the fused kernel keeps scores in fp32. Max relative error against float64 on random inputs:
    0.011 here, 0.005 for bf16 SDPA. Memory: B·H·N² probabilities per layer are kept for the
    backward (3 MB for the tiny preset's 65 image tokens).
    """
    b, n, three_d = qkv.shape
    d = three_d // (3 * heads)
    # one copy into (3, batch·heads, tokens, d_head): q, k, v contiguous for the batched matmuls
    q, k, v = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, d).unbind(0)
    if mask is not None:
        add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        scores = torch.baddbmm(
            add.expand(b, heads, n, n).reshape(b * heads, n, n), q, k.transpose(1, 2), alpha=d**-0.5
        )
    elif causal:
        causal_mask = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        scores = torch.baddbmm(causal_mask, q, k.transpose(1, 2), alpha=d**-0.5)
    else:
        scores = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0, alpha=d**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(b, heads, n, d).transpose(1, 2).reshape(b, n, heads * d)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask`: (B, 1, N, N) booleans, true where a query may attend a key (it replaces `causal`)."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
            return self.out_proj(explicit_attention(qkv, self.heads, causal, mask))
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ActivationProjection(torch.autograd.Function):
    """y = act(h) Wᵀ + b, keeping h — not act(h) as autograd would, too — for the backward.

    The backward recomputes a = act(h) (one elementwise pass, no autograd graph) and returns ∂L/∂W = gᵀ a,
    ∂L/∂b = Σ g, ∂L/∂h = act′(h) ⊙ (g W): the same values as autograd's, with one 4·width tensor
    per token less held from the forward to the backward (−97 MB of the tiny preset's ~450 MB of
    saved activations at batch 128 in bf16, for ~2 % more step time; docs/benchmarks.md). In that
    order, and with act′(h) ⊙ (g W) written over g W, it holds one 4·width temporary at a time
    besides h, not two: −85 MB of peak RSS for the tiny preset at batch 128 in bf16, same time.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kind: str):
        ctx.kind = kind
        ctx.save_for_backward(h, weight)
        return F.linear(activation(kind, h), weight, bias)  # under autocast: c_proj(act(h))'s casts

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative is refused, not wrong
    def backward(ctx, grad_y: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad_y.to(h.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:  # first: act(h) is freed before ∂L/∂h's buffer exists
            grad_w = g2.t() @ activation(ctx.kind, h).reshape(-1, h.shape[-1])  # autograd casts it
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        if ctx.needs_input_grad[0]:
            grad_h = activation_backward(ctx.kind, g @ weight.to(h.dtype), h)
        return grad_h, grad_w, grad_b, None


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.kind = "quick_gelu" if quick_gelu else "gelu"
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if h.requires_grad and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            return ActivationProjection.apply(h, self.c_proj.weight, self.c_proj.bias, self.kind)
        return self.c_proj(self.gelu(h))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu)

    def forward(
        self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )
        std = (2 * layers) ** -0.5 * width**-0.5  # GPT-2 style: shrink residual branch outputs
        for block in self.resblocks:
            nn.init.normal_(block.attn.out_proj.weight, std=std)
            nn.init.normal_(block.mlp.c_proj.weight, std=std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        # activation (gradient) checkpointing: keep only each block's input during the forward and
        # recompute the block in the backward — activation memory of one block instead of all of them
        self.checkpointing = False

    def forward(
        self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for block in self.resblocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask)
        return x
