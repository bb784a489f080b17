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

from lipkit.train.inputs import INPUTS

RngState = tuple[torch.Tensor, torch.Tensor | None]


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
    embed: Callable[[slice, set[str]], dict[str, torch.Tensor]],
    batch: int,
    chunk: int,
    needs: set[str],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    device: torch.device,
    before_last: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Steps 1–3 above. `embed(rows, names)` computes the named inputs (train.inputs.INPUTS) of the
    images `rows` of the batch (`batch` images) and their captions. The registry says which inputs are
    embedded chunk by chunk with their gradients cached (float features, rows image-major) and which
    are computed once for the whole batch (the logit scale, caption owners, the frozen teacher, ...);
    `loss_fn` gets them all. Gradients accumulate in the parameters; returns the loss. `before_last` runs
    before the last backward pass (the one after which every gradient is complete: the bucketed
    all-reduce arms there, train.reducer)."""
    # in the registry's order (not a set's, which differs between processes): the same collectives
    chunked = [name for name, entry in INPUTS.items() if name in needs and entry.cache == "chunk"]
    chunks = [slice(s, min(s + chunk, batch)) for s in range(0, batch, chunk)]
    states, parts = [], []
    with torch.no_grad():
        for ch in chunks:
            states.append(rng_snapshot(device))
            parts.append(embed(ch, set(chunked)))
    whole = embed(slice(0, batch), needs - set(chunked))  # with a graph: the logit scale/bias get gradients
    cached = {name: torch.cat([p[name] for p in parts]).float().requires_grad_() for name in chunked}
    loss = loss_fn({**cached, **whole})
    loss.backward()  # gradients reach the logit scale/bias directly and the cached embeddings
    for ch, state in zip(chunks, states, strict=True):
        with replayed_rng(state, device):
            part = embed(ch, set(chunked))
        surrogate = torch.zeros((), device=device)
        for name, value in part.items():
            grad = cached[name].grad
            if grad is not None:  # rows: one or more per image (every caption), image-major
                per = value.shape[0] // (ch.stop - ch.start)
                surrogate = surrogate + (value.float() * grad[ch.start * per : ch.stop * per]).sum()
        if surrogate.requires_grad:
            if before_last is not None and ch is chunks[-1]:
                before_last()
            surrogate.backward()
    return loss
