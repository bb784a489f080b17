"""Reduced-token late interaction, after Wukong (Gu et al., 2022, "Wukong: A 100 Million Large-scale
Chinese Cross-modal Pre-training Benchmark", its "reduced-token interaction"): FILIP's token-wise
similarity computed over a few image tokens instead of all of them, which cuts the cost of the
token-wise similarity (and of storing image tokens for retrieval) by N / K.

With L2-normalised image tokens x_ik (k = 1..N), their mean m_i = 1/N Σ_k x_ik (the image's average
direction) and K = `image_tokens_kept`, the kept tokens of image i are the K with the largest <x_ik, m_i>
(chosen without gradient; ties to the earlier token; kept in their original order):

    T_i = top-K_k <x_ik, m_i>
    s^I_ij = 1/K Σ_{k ∈ T_i} max_{r ∈ R_j} <x_ik, y_jr>,    s^T_ij = 1/|R_j| Σ_{r ∈ R_j} max_{k ∈ T_i} <x_ik, y_jr>
    L = ½ [ CE over rows of t·s^I  +  CE over columns of t·s^T ]        (lipkit.objectives.filip)

K = None, or K ≥ N, keeps every token and is FILIP exactly.

What is not implemented of the paper:
- Wukong's token-reduction layer is learned (a layer in the manner of TokenLearner that makes K new
  tokens from the patch grid; 12 tokens for ViT-B, 24 for ViT-L); here K of the existing tokens are kept, the
  ones most aligned with the image's mean token — no parameters, so any FILIP checkpoint can be scored
  with it and K can change after training. (Not the pooled feature: a token-wise objective leaves the
  pooled output untrained.)
- The locked-image (LiT) setting the paper pairs it with is a separate switch (`train.lock_image`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lipkit.objectives.filip import FILIPLoss

DEFAULT_KEPT = 12  # Wukong ViT-B's reduced token count


def kept_tokens(image_tokens: torch.Tensor, keep: int | None) -> torch.Tensor:
    """(B, K, D): the `keep` tokens of each image most similar to its mean token, in token order."""
    b, n, d = image_tokens.shape
    if keep is None or keep >= n:
        return image_tokens
    with torch.no_grad():
        score = (image_tokens * image_tokens.mean(dim=1, keepdim=True)).sum(dim=-1)  # (B, N)
        # a stable sort ranks equal scores by token position, so ties never depend on the backend
        order = score.sort(dim=1, descending=True, stable=True).indices
        index = order[:, :keep].sort(dim=1).values
    return image_tokens.gather(1, index[..., None].expand(b, keep, d))


class ReducedTokenInteraction(nn.Module):
    inputs: ClassVar[tuple[str, ...]] = ("image_tokens", "text_tokens", "text_mask", "logit_scale")

    def __init__(self, image_tokens_kept: int | None = DEFAULT_KEPT, chunk_size: int | None = None) -> None:
        """`image_tokens_kept` K: image tokens each image keeps (None: all, which is FILIP). `chunk_size`:
        captions compared with the whole image batch at once (None: by memory budget)."""
        super().__init__()
        if image_tokens_kept is not None and (
            isinstance(image_tokens_kept, bool)
            or not isinstance(image_tokens_kept, int)
            or image_tokens_kept < 1
        ):
            raise ValueError(
                f"image_tokens_kept must be a positive whole number or null, not {image_tokens_kept!r}"
            )
        self.image_tokens_kept = None if image_tokens_kept is None else int(image_tokens_kept)
        self.chunk_size = chunk_size
        self.filip = FILIPLoss(chunk_size)  # FILIP's loss over the kept tokens

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        logit_scale: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        tokens = kept_tokens(image_tokens, self.image_tokens_kept)
        return self.filip(tokens, text_tokens, logit_scale, text_mask)
