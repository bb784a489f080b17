"""FILIP's token-wise late-interaction loss (Yao et al., 2021, "FILIP: Fine-grained Interactive
Language-Image Pre-Training").

With L2-normalised image tokens x_ik (k = 1..N) and text tokens y_jr (r ∈ R_j, the non-padding
tokens of caption j given by `text_mask`):

    s^I_ij = 1/N     Σ_k        max_{r ∈ R_j} <x_ik, y_jr>     (each image token finds its best word)
    s^T_ij = 1/|R_j| Σ_{r ∈ R_j} max_k        <x_ik, y_jr>     (each word finds its best patch)

    L = ½ [ CE over rows of t·s^I (image i → caption i)  +  CE over columns of t·s^T (caption j → image j) ]

with t = `logit_scale` (already exponentiated). Padding tokens take part in neither a max nor a mean,
so appending padding never changes a score; every caption needs at least one unmasked token.

The B_img × B_txt × N × L similarity tensor is never built whole: text captions are processed in
chunks sized to a fixed element budget (or `chunk_size` captions at a time). Autograd keeps only the
arg-max indices, O(B²·(N + L)), not the O(B²·N·L) similarities.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # similarities held at once when no chunk size is given (64 MiB in float32)


def filip_similarity(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s^I, s^T), each (B_img, B_txt): image-to-text and text-to-image token-wise similarity.

    `image_tokens` (B_img, N, D), `text_tokens` (B_txt, L, D), `text_mask` (B_txt, L), true (or
    non-zero) for real tokens; None means every token is real. `chunk_size` captions are compared with
    all images at a time.
    """
    b_img, n, d = image_tokens.shape
    b_txt, length, _ = text_tokens.shape
    if text_mask is None:
        text_mask = torch.ones(b_txt, length, dtype=torch.bool, device=text_tokens.device)
    text_mask = text_mask.bool()
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, b_img * n * length))
    flat_image = image_tokens.reshape(b_img * n, d)
    counts = text_mask.sum(1).clamp(min=1).to(image_tokens.dtype)  # (B_txt,)
    s_image, s_text = [], []
    for start in range(0, b_txt, chunk_size):
        tokens = text_tokens[start : start + chunk_size]
        mask = text_mask[start : start + chunk_size]  # (c, L)
        c = tokens.shape[0]
        sims = (flat_image @ tokens.reshape(c * length, d).t()).view(b_img, n, c, length)
        # image → text: best real word for every patch, averaged over patches
        best_word = sims.masked_fill(~mask[None, None], float("-inf")).max(dim=3).values  # (B_img, N, c)
        s_image.append(best_word.mean(dim=1))
        # text → image: best patch for every word, averaged over the real words
        best_patch = sims.max(dim=1).values.masked_fill(~mask[None], 0.0)  # (B_img, c, L)
        s_text.append(best_patch.sum(dim=2) / counts[start : start + chunk_size])
    return torch.cat(s_image, dim=1), torch.cat(s_text, dim=1)


class FILIPLoss(nn.Module):
    local_form: ClassVar[str | None] = "rows"  # train.local_losses: each rank its own rows and columns
    inputs: ClassVar[tuple[str, ...]] = ("image_tokens", "text_tokens", "text_mask", "logit_scale")

    def __init__(self, chunk_size: int | None = None) -> None:
        """`chunk_size`: captions compared with the whole image batch at once (None: by memory budget)."""
        super().__init__()
        self.chunk_size = chunk_size

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        logit_scale: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        s_image, s_text = filip_similarity(image_tokens, text_tokens, text_mask, self.chunk_size)
        labels = torch.arange(s_image.shape[0], device=s_image.device)
        return 0.5 * (
            F.cross_entropy(logit_scale * s_image, labels) + F.cross_entropy(logit_scale * s_text.t(), labels)
        )
