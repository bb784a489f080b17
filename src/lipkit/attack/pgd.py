"""White-box projected gradient ascent on images (PGD; Madry et al., 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks"), and the two losses it ascends for a dual encoder.

With x ∈ [0, 1]^{3×H×W} an image (before the model's mean/std normalisation), L(x) a per-image loss, ε the
budget and α the step, from a random start δ₀ in the ball (uniform in the ℓ∞ cube; for ℓ2 a random direction
at radius ε·u, u ~ U(0, 1)):

    ℓ∞:  δ ← Π_ε(δ + α·sign(∇_δ L(x + δ)))            Π_ε: clip each pixel to [−ε, ε]
    ℓ2:  δ ← Π_ε(δ + α·∇_δ L / ‖∇_δ L‖₂)              Π_ε: scale onto the ball ‖δ‖₂ ≤ ε
    then δ ← clip(x + δ, 0, 1) − x                      (a real image), `steps` times

and the adversarial image is x + δ with each pixel's change truncated toward zero to whole 1/255 levels
(`toward`: an 8-bit image, as a file holds it, never further from x than PGD went — up to 1/1000 of a
level, so that float error in x + δ does not drop a whole level — so within ε in both norms; changes
under 1/255 are dropped). ε = 0 returns x itself.

Losses (the model in eval mode; t its logit scale; f the normalised image embedding):
    zero-shot:  L(x) = CE(t·f(x)·Cᵀ, y)              C the (re-normalised) class embeddings, y the label
    retrieval:  L(x) = −log Σ_{j ∈ R(x)} softmax_j(t·f(x)·Tᵀ)    T the split's caption embeddings, R(x)
                the captions describing the image: the image is pushed away from its own captions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

NORMS = ("linf", "l2")
LEVEL_SLACK = 1e-3  # of a 1/255 level: float error in x + δ must not drop a whole level
Loss = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [0, 1] → (B,) losses to ascend


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """δ onto the ε-ball of `norm`, image by image."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    length = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (eps / length).clamp(max=1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1).to(x.device) * eps
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    radius = torch.rand(x.shape[0], generator=gen, dtype=x.dtype).to(x.device).view(-1, 1, 1, 1) * eps
    return direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * radius


def pgd(
    loss: Loss, x: torch.Tensor, eps: float, steps: int, step_size: float, norm: str, gen: torch.Generator
) -> torch.Tensor:
    """x + δ after `steps` projected ascent steps on `loss` (module docstring), in [0, 1], float."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if eps == 0 or steps == 0:
        return x.clone()
    delta = (x + random_start(x, eps, norm, gen)).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(x + delta).sum(), delta)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = project(delta + step_size * step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def toward(clean_u8: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """The 8-bit image nearest to `adversarial` on the clean image's side: each pixel's change truncated
    toward zero to whole 1/255 levels, so no pixel moves further than PGD moved it (both norms stay within
    ε; a change smaller than 1/255 is dropped)."""
    change = (adversarial - clean_u8.to(adversarial.dtype) / 255) * 255
    change = torch.trunc(change + change.sign() * LEVEL_SLACK)  # 0.9999… of a level (float error) is one
    return (clean_u8.to(torch.int16) + change.to(torch.int16)).clamp(0, 255).to(torch.uint8)


def embeddings(model, x: torch.Tensor) -> torch.Tensor:
    """The image tower's pooled embeddings (not normalised) of [0, 1] pixels, normalised by mean/std first."""
    mean = torch.tensor(model.spec.image_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.image_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return model.encode_image((x - mean) / std, normalize=False).to(x.dtype)


def _features(model, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings(model, x), dim=-1)


def zeroshot_loss(model, classes: torch.Tensor, labels: torch.Tensor) -> Loss:
    """CE of the zero-shot logits t·f(x)·Cᵀ against `labels` (B,), per image."""
    scale = model.scale().detach()
    return lambda x: F.cross_entropy(
        scale * _features(model, x) @ classes.to(x).t(), labels, reduction="none"
    )


def retrieval_loss(model, texts: torch.Tensor, relevant: Sequence[Sequence[int]]) -> Loss:
    """−log of the softmax mass on each image's own captions (`relevant[i]`: their rows of `texts`)."""
    scale = model.scale().detach()
    mask = torch.zeros(len(relevant), texts.shape[0], dtype=torch.bool)
    for i, rows in enumerate(relevant):
        mask[i, list(rows)] = True

    def loss(x: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scale * _features(model, x) @ texts.to(x).t(), dim=1)
        return -logp.masked_fill(~mask.to(x.device), float("-inf")).logsumexp(1)

    return loss
