"""Local forms of the objectives (`train.local_loss`): each rank computes only its share of the loss.

Contract: `local_loss(objective, inputs, d)` takes this rank's *local* objective inputs (as
`train.inputs.objective_inputs` builds them for the local batch of b images) and returns a loss L_r with

    Σ_r L_r = W·L   and   Σ_r ∇L_r = W·∇L,

L the objective on the global batch of B = W·b images (the inputs gathered in rank order, as
`train.distributed.gather_inputs` does): the mean of the ranks' losses is the global loss, and parameter
gradients averaged over the W ranks are exactly the single-process gradients. Every normaliser that
depends on the global batch is the global one.

An objective class declares its form in `local_form`; objectives without one have none (and
`train.distributed.check_scaling` refuses `train.local_loss` for them):

"rows" (InfoNCE, multi-positive, FILIP): rank r gathers the other side with gradient and computes only
its own rows of each direction — its b images against all captions (image → text) and its captions
against all images (text → image), targets offset by r·b. With a per-row term ℓ and the global mean
1/N Σ_rows ℓ, rank r's share is W/N Σ_{rows of r} ℓ (= the local mean when every rank has N/W rows):

    InfoNCE, FILIP:  L_r = ½ [ 1/b Σ_{i ∈ r} CE(t·s_i·, r·b + i) + 1/b Σ_{j ∈ r} CE(t·s_·j, r·b + j) ]
    multi-positive:  L_r = ½ [ W/|I| Σ_{i ∈ r} ℓ^{i2t}_i + 1/T_r Σ_{j ∈ r} ℓ^{t2i}_j ]

with |I| the images of the *global* batch that own a caption and T_r = T/W the rank's captions; the
positives (caption owners, with `same_text_positive` every identical text) come from the gathered
owners and caption keys (`objectives.multi_positive.positive_weight`). Logits held: b × B per direction.

"ring" (SigLIP; Zhai et al., 2023, §3.3, OpenCLIP's `SigLipLoss` with neighbour exchange):

    L_r = 1/b [ Σ_{i ∈ r} Σ_{j ∈ all} softplus(u_ij) − Σ_{i ∈ r} u_ii ],   u_ij = t·<x_i, y_j> + bias

(L divides the same sums over all i by B = W·b, so Σ_r L_r = W·L.) The forward adds the block of the
rank's images against its own texts, then W−1 times passes the text block on round the ring (to rank
r+1, from rank r−1) and adds that negatives-only block; the backward recomputes each block and sends
each text block's accumulated gradient round the ring with it, so it reaches its owner after W steps.
A rank holds one b × b block of logits at a time (two b × b buffers at most: the block and its
softplus or sigmoid; chunk_size × b with the objective's `chunk_size`) and O(b·D) features: no
all-gather at all. The backward's recomputation costs one more b × b × D product per block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lipkit.objectives.filip import FILIPLoss, filip_similarity
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.multi_positive import MultiPositiveInfoNCE, positive_weight
from lipkit.objectives.sigmoid import SigmoidLoss
from lipkit.train.distributed import Dist, gather, gather_inputs, ring_exchange

Inputs = dict[str, torch.Tensor]


def local_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, d: Dist) -> torch.Tensor:
    """InfoNCE over the rows this rank owns, against the global batch of the other modality."""
    all_image, all_text = gather(image), gather(text)
    labels = torch.arange(image.shape[0], device=image.device) + d.rank * image.shape[0]
    i2t = F.cross_entropy(scale * image @ all_text.t(), labels)
    t2i = F.cross_entropy(scale * text @ all_image.t(), labels)
    return 0.5 * (i2t + t2i)


def _infonce(objective: InfoNCE, inputs: Inputs, d: Dist) -> torch.Tensor:
    return local_infonce(inputs["image_features"], inputs["text_features"], inputs["logit_scale"], d)


def _multi_positive(objective: MultiPositiveInfoNCE, inputs: Inputs, d: Dist) -> torch.Tensor:
    """Multi-positive InfoNCE (incl. `same_text_positive`) over this rank's images and captions."""
    x, y, scale = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    b, t = x.shape[0], y.shape[0]
    every = gather_inputs(inputs, d, b)  # features with gradient, owners offset by rank·b, keys plain
    owner = every["caption_owner"]
    key = every["caption_key"] if objective.same_text_positive else None
    # image → text: this rank's images against every caption; |I| counts the global batch's images
    logits = scale * x @ every["text_features"].t()  # (b, T)
    weight = positive_weight(owner, key, range(d.rank * b, (d.rank + 1) * b), range(owner.numel()), x.dtype)
    target = weight / weight.sum(1, keepdim=True).clamp(min=1e-12)
    with_caption = owner.unique().numel()  # images owning at least one caption (rows with a target)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum() * d.world / max(with_caption, 1)
    # text → image: this rank's captions against every image
    logits = scale * every["image_features"] @ y.t()  # (B, t)
    if key is None:
        t2i = F.cross_entropy(logits.t(), inputs["caption_owner"].long() + d.rank * b)
    else:
        weight = positive_weight(owner, key, range(d.world * b), range(d.rank * t, (d.rank + 1) * t), x.dtype)
        t2i = -(weight / weight.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum() / t
    return 0.5 * (i2t + t2i)


def _filip(objective: FILIPLoss, inputs: Inputs, d: Dist) -> torch.Tensor:
    """FILIP over this rank's images (s^I rows) and captions (s^T columns)."""
    image, text, scale = inputs["image_tokens"], inputs["text_tokens"], inputs["logit_scale"]
    every = gather_inputs(inputs, d, image.shape[0])
    labels = torch.arange(image.shape[0], device=image.device) + d.rank * image.shape[0]
    # each call also computes the other direction's scores (discarded): 2·b·B·N·L similarities in all
    s_image, _ = filip_similarity(image, every["text_tokens"], every.get("text_mask"), objective.chunk_size)
    _, s_text = filip_similarity(every["image_tokens"], text, inputs.get("text_mask"), objective.chunk_size)
    return 0.5 * (F.cross_entropy(scale * s_image, labels) + F.cross_entropy(scale * s_text.t(), labels))


def _softplus_sum(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, chunk: int):
    """Σ_ij softplus(t·<x_i, y_j> + bias), `chunk` rows of x at a time."""
    total = x.new_zeros(())
    for start in range(0, x.shape[0], chunk):  # in place where it can: two blocks alive at most
        total = total + F.softplus((x[start : start + chunk] @ y.t()).mul_(scale).add_(bias)).sum()
    return total


def _block_backward(x, y, scale, bias, g, chunk, grads):  # type: ignore[no-untyped-def]
    """Add the gradients of g·Σ_ij softplus(u_ij) over the block x × y to grads = [x, y, scale, bias]."""
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        sims = x[rows] @ y.t()
        p = (sims * scale).add_(bias).sigmoid_().mul_(g)  # ∂/∂u of g·softplus(u); two blocks alive at most
        grads[0][rows] += scale * (p @ y)
        grads[1] += scale * (p.t() @ x[rows])
        grads[2] += p.flatten() @ sims.flatten()  # Σ p_ij·sims_ij without a third block
        grads[3] += p.sum()


class _SigmoidRing(torch.autograd.Function):
    """This rank's share of the sigmoid loss by neighbour exchange (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, chunk):  # type: ignore[override]
        world = dist.get_world_size()
        with torch.autocast(x.device.type, enabled=False):
            total, block = _softplus_sum(x, y, scale, bias, chunk), y
            for _ in range(world - 1):  # after k steps: the texts of rank r−k
                (block,) = ring_exchange(block)
                total = total + _softplus_sum(x, block, scale, bias, chunk)
            diagonal = scale * (x * y).sum() + x.shape[0] * bias  # Σ_i u_ii: the rank's own pairs
        ctx.save_for_backward(x, y, scale, bias)
        ctx.chunk = chunk
        return (total - diagonal) / x.shape[0]

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        world, g = dist.get_world_size(), grad_out / x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            # the −Σ_i u_ii term in closed form, then every block's softplus term
            grad_x, grad_scale = -scale * g * y, torch.zeros_like(scale) - g * (x * y).sum()
            grad_bias = torch.zeros_like(bias) - g * x.shape[0]
            block, grad_block = y, -scale * g * x  # a text block and its gradient so far
            for step in range(world):
                if step:  # pass the block on with what this and earlier ranks added to its gradient
                    block, grad_block = ring_exchange(block, grad_block)
                grads = [grad_x, grad_block, grad_scale, grad_bias]
                _block_backward(x, block, scale, bias, g, ctx.chunk, grads)
                grad_x, grad_block, grad_scale, grad_bias = grads
            # every rank has added to the block it holds, the texts of rank r+1: one more step home
            (grad_y,) = ring_exchange(grad_block) if world > 1 else (grad_block,)
        return grad_x, grad_y, grad_scale, grad_bias, None


def _siglip_ring(objective: SigmoidLoss, inputs: Inputs, d: Dist) -> torch.Tensor:
    x, y = inputs["image_features"], inputs["text_features"]
    scale = torch.as_tensor(inputs["logit_scale"], dtype=x.dtype, device=x.device)
    bias = torch.as_tensor(inputs["logit_bias"], dtype=x.dtype, device=x.device)
    chunk = min(objective.chunk_size or x.shape[0], x.shape[0])
    return _SigmoidRing.apply(x, y, scale, bias, chunk)


# each class declaring a `local_form` → its implementation here
LOCAL_FORMS: dict[type, Callable[[Any, Inputs, Dist], torch.Tensor]] = {
    InfoNCE: _infonce,
    MultiPositiveInfoNCE: _multi_positive,
    FILIPLoss: _filip,
    SigmoidLoss: _siglip_ring,
}


def local_loss(objective: Any, inputs: Inputs, d: Dist) -> torch.Tensor:
    """This rank's share of `objective` (see the module docstring)."""
    form = LOCAL_FORMS.get(type(objective))
    if form is None or getattr(objective, "local_form", None) is None:  # check_scaling refuses these
        raise ValueError(f"{type(objective).__name__} declares no local form")
    return form(objective, inputs, d)
