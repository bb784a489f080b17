"""Hard-negative contrast with false-negative filtering, after UniME's hard-negative-enhanced instruction
tuning (Gu et al., 2025, "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal
LLMs", §3.3, and the authors' loss code).

With L2-normalised image features x_i, first-caption features y_j, cosine similarities s_ij = <x_i, y_j>,
the key k_j of caption j's token ids (`text_key`) and logits t·s_ij, the candidates of the query image i
are the captions j ≠ i that are

    not a copy of its own caption            k_j ≠ k_i     (a duplicate caption is never a negative)
    not a likely false negative               s_ij ≤ s_ii + β   (UniME's threshold α = cos(q, c⁺) + β)

and its negatives N_i are the K candidates of highest s_ij (UniME's hard-negative sampling; all of them
when fewer than K remain, or with K = None). Then

    L_i2t = −1/B Σ_i log [ exp(t s_ii) / (exp(t s_ii) + Σ_{j ∈ N_i} exp(t s_ij)) ]

and L_t2i the same with the roles swapped (the query caption j against images i ≠ j, excluding images
whose own caption is a copy of caption j, thresholded at s_jj + β, top K); L = ½ (L_i2t + L_t2i).
The selection is made without gradient (indices only); the loss is differentiable in the kept logits.

Neutral values: β = None (no threshold) and K = None (every candidate) on a batch without repeated
captions is exactly CLIP's InfoNCE. Defaults are the authors' (β = 0.1, K = 8). Features and caption keys
are gathered across ranks first, so two ranks select from the same global batch as one process.

What is not implemented of the paper:
- UniME's first stage (textual discriminative knowledge distillation from an LLM embedder) and its
  multimodal LLM backbone with instruction prompts: here the loss trains lipkit's two towers.
- The fixed temperature τ = 0.02 of the authors' code: the logit scale is CLIP's learned one
  (`train.init_logit_scale=50` starts it at theirs; it stays learnable).
- The paper's loss runs from query to candidate only; here both directions are averaged, as CLIP does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def negative_mask(
    sims: torch.Tensor, keys: torch.Tensor | None, threshold: float | None, hard_negatives: int | None
) -> torch.Tensor:
    """(B, B) bool: the entries each row's softmax keeps — its positive (the diagonal) and its negatives.

    `sims` (B, B) cosine similarities of row queries to column candidates; `keys` (B,) caption keys of the
    pairs (a candidate whose key equals the query's is never a negative); `threshold` β: candidates above
    the positive's similarity + β are left out; `hard_negatives` K: only the K most similar remain."""
    b = sims.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sims.device)
    keep = ~eye
    if keys is not None:
        keep &= keys[:, None] != keys[None, :]
    if threshold is not None:
        keep &= sims <= sims.diagonal()[:, None] + threshold
    if hard_negatives is not None and hard_negatives < b - 1:
        ranked = sims.masked_fill(~keep, float("-inf"))  # a stable sort: ties go to the earlier column
        top = ranked.sort(dim=1, descending=True, stable=True).indices[:, :hard_negatives]
        chosen = torch.zeros_like(keep).scatter_(1, top, True)
        keep &= chosen
    return keep | eye


def masked_direction(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of each row's diagonal entry against the row's kept entries."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits.masked_fill(~keep, float("-inf")), labels)


class HardNegativeContrast(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "text_key", "logit_scale")

    def __init__(self, threshold: float | None = 0.1, hard_negatives: int | None = 8) -> None:
        """`threshold` β: a candidate more similar than the positive + β is taken for a false negative and
        left out (None: none is). `hard_negatives` K: the most similar K candidates are the negatives
        (None: all of them)."""
        super().__init__()
        if hard_negatives is not None and (
            isinstance(hard_negatives, bool) or not isinstance(hard_negatives, int) or hard_negatives < 1
        ):
            raise ValueError(
                f"hard_negatives must be a positive whole number or null, not {hard_negatives!r}"
            )
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise ValueError(f"threshold must be a number or null, not {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.hard_negatives = None if hard_negatives is None else int(hard_negatives)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        text_key: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError("hard-negative contrast pairs each image with one caption (its first)")
        sims = image_features @ text_features.t()
        with torch.no_grad():
            rows = negative_mask(sims.detach(), text_key, self.threshold, self.hard_negatives)
            cols = negative_mask(sims.detach().t(), text_key, self.threshold, self.hard_negatives)
            self.last_stats = {"negatives_kept": (rows.sum() - rows.shape[0]).double() / rows.shape[0]}
        logits = logit_scale * sims
        return 0.5 * (masked_direction(logits, rows) + masked_direction(logits.t(), cols))
