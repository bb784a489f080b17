"""DreamLIP's multi-positive contrast plus its sub-caption specific grouping loss (Zheng et al., 2024,
"DreamLIP: Language-Image Pre-training with Long Captions"; the authors' code, github.com/zyf0619sjtu/
DreamLIP, `open_clip/loss.py`, `use_finegrained_loss`).

An image has k sub-captions (the sentences of its long captions, `data.split_sentences`, sampled as
`data.captions_per_image`). With L2-normalised caption features y_j of the T = B·k captions, caption j
belonging to image o_j (`caption_owner`), the image's L2-normalised patch tokens v_{o_j,p}, p = 1..M
(`image_tokens`, in the joint space) and logit scale t:

    s_jp = <y_j, v_{o_j,p}>                                   (each sub-caption against its image's patches)
    ŝ_jp = (s_jp − min_p s_jp) / (max_p s_jp − min_p s_jp + 1e-10),  set to 0 where ŝ_jp < δ
    g_j  = normalise( Σ_p ŝ_jp v_{o_j,p} / Σ_p ŝ_jp )         (the patches this sub-caption groups)
    L_group = ½ [ CE_j(t·<g_j, y_·>, j) + CE_j(t·<y_j, g_·>, j) ]     over the T (g_j, y_j) pairs
    L = L_multi-positive(x, y) + λ · L_group                  (λ = `grouping_weight`, δ = `threshold`)

where L_multi-positive is lipkit's `multi_positive` objective (the image against all its sub-captions).
λ = 0 is `multi_positive` exactly. The caption owners and tokens are gathered across ranks with the
features, so every rank sees the global batch's T pairs, as one process does.

What is not implemented of the paper:
- The long captions themselves (written by a multimodal LLM for 30M images); lipkit uses the sentences
  of whatever captions the data has.
- The reference's CLIP term is the first caption's InfoNCE divided by k plus a circle loss between the
  image and its sub-captions (γ = 32, margin 0.25, scaled by 1/10); here the image–text term is lipkit's
  multi-positive InfoNCE (the form the paper's text describes).
- The reference's separate learnable local logit scale (disabled in the released code, which then passes
  none); here the grouping term uses the model's scale t. Its softmax normalisation (`sgl_norm`) and the
  optimal-transport and DeCLIP variants of the same file are not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.multi_positive import MultiPositiveInfoNCE


def grouped_patches(captions: torch.Tensor, tokens: torch.Tensor, threshold: float) -> torch.Tensor:
    """captions (T, D), tokens (T, M, D) — each caption's own image's patches → (T, D) unit vectors: the
    patches weighted by their min-max normalised similarity to the caption, below `threshold` dropped."""
    s = torch.einsum("td,tmd->tm", captions, tokens)
    lo, hi = s.min(1, keepdim=True).values, s.max(1, keepdim=True).values
    w = (s - lo) / (hi - lo + 1e-10)
    w = torch.where(w < threshold, torch.zeros_like(w), w)
    pooled = torch.einsum("tm,tmd->td", w / w.sum(1, keepdim=True).clamp(min=1e-12), tokens)
    return F.normalize(pooled, dim=-1)


class SubCaptionGrouping(nn.Module):
    def __init__(self, grouping_weight: float = 1.0, threshold: float = 0.0) -> None:
        """`grouping_weight` λ of the grouping term; `threshold` δ ∈ [0, 1) below which a patch's
        normalised similarity counts as 0 (the reference's `sgl_delta`, default 0; the best patch's is
        just under 1, so δ < 1 always keeps it)."""
        super().__init__()
        for name, value in (("grouping_weight", grouping_weight), ("threshold", threshold)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")
        if threshold >= 1:
            raise ValueError(f"threshold must be below 1 (1 would drop every patch), got {threshold!r}")
        self.grouping_weight, self.threshold = float(grouping_weight), float(threshold)
        # the image tokens only when the grouping term is on (λ = 0 reads exactly what multi_positive reads)
        tokens = ("image_tokens",) if self.grouping_weight else ()
        self.inputs = ("image_features", "text_features", "caption_owner", "logit_scale", *tokens)
        self.multi_positive = MultiPositiveInfoNCE()
        self.infonce = InfoNCE()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        caption_owner: torch.Tensor,
        logit_scale: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = self.multi_positive(image_features, text_features, caption_owner, logit_scale)
        if not self.grouping_weight:
            return loss
        if image_tokens is None:
            raise ValueError("the grouping term reads image_tokens: pass the images' token features")
        tokens = image_tokens[caption_owner.long()].to(text_features.dtype)  # (T, M, D)
        grouped = grouped_patches(text_features, tokens, self.threshold)
        group = self.infonce(grouped, text_features, logit_scale)
        self.last_stats = {"grouping_loss": group.detach()}
        return loss + self.grouping_weight * group
