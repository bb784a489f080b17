"""Gradient caching (GradCache: Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): a contrastive batch far larger than its activations would allow.

With embeddings e = f_θ(x) of the whole batch and loss L(e):
    1. e = f_θ(x) chunk by chunk without a graph;
    2. g = ∂L/∂e, one backward through the loss only;
    3. for each chunk c, re-embed e_c = f_θ(x_c) with a graph and back-propagate the surrogate Σ e_c · g_c,
       whose gradient is Σ_c (∂e_c/∂θ)ᵀ g_c = ∂L/∂θ.
Step 3 is exact only if the re-embedding reproduces step 1's e_c: any randomness inside f_θ (dropout,
e.g. an unlocked Hugging Face text tower) must draw the same numbers twice. So each chunk's RNG state is
recorded before its no-grad pass and restored for its re-embedding (GradCache's `RandContext`); the
global RNG then continues from where step 1 left it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

RngState = tuple[torch.Tensor, torch.Tensor | None]
CACHED = ("image_features", "text_features")


def rng_snapshot(device: torch.device) -> RngState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def replayed_rng(state: RngState, device: torch.device) -> Iterator[None]:
    """Run the block from `state`; the RNG is back where it was afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def grad_cache_backward(
    embed: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    images: torch.Tensor,
    ids: torch.Tensor,
    chunk: int,
    per_image: int,
    extras: dict[str, torch.Tensor],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """Steps 1–3 above. `embed(images, ids)` returns the pooled features of a chunk (`ids` holds
    `per_image` captions per image, image-major); `loss_fn` gets them for the whole batch plus `extras`
    (logit scale, caption owners, ...). Gradients accumulate in the parameters; returns the loss."""
    k, device = per_image, images.device
    chunks = [slice(s, s + chunk) for s in range(0, images.shape[0], chunk)]
    states, parts = [], []
    with torch.no_grad():
        for ch in chunks:
            states.append(rng_snapshot(device))
            parts.append(embed(images[ch], ids[ch.start * k : ch.stop * k]))
    cached = {name: torch.cat([p[name] for p in parts]).float().requires_grad_() for name in CACHED}
    loss = loss_fn({**cached, **extras})
    loss.backward()  # gradients reach the logit scale/bias directly and the cached embeddings
    for ch, state in zip(chunks, states, strict=True):
        with replayed_rng(state, device):
            part = embed(images[ch], ids[ch.start * k : ch.stop * k])
        n = part["image_features"].shape[0]
        per = part["text_features"].shape[0] // n  # k captions per image (multi-positive) or 1
        rows = {"image_features": ch, "text_features": slice(ch.start * per, (ch.start + n) * per)}
        surrogate = sum((part[f].float() * cached[f].grad[rows[f]]).sum() for f in CACHED)
        surrogate.backward()
    return loss
