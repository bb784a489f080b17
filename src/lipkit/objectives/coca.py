"""CoCa's objective: a contrastive loss beside a captioning loss (Yu et al., 2022, "CoCa: Contrastive
Captioners are Image-Text Foundation Models").

With the caption decoder (models.caption_decoder) predicting each first caption's tokens from the image's
projected tokens under teacher forcing, NLL_i the summed negative log-likelihood of caption i's predicted
tokens and T_i their count, over the global batch:

    L_cap = Σ_i NLL_i / Σ_i T_i                        (the mean over every predicted token)
    L     = w · InfoNCE(image, caption) + λ · L_cap    (w = `contrastive_weight`, λ = `caption_weight`)

CoCa weighs the captioning loss λ = 2 against the contrastive loss (w = 1), lipkit's defaults. w = 0 trains
the decoder alone — on a frozen checkpoint with both towers locked (`model.init_from`,
`train.lock_image=all`, `train.lock_text=all`), the decoder is a captioner for a trained model.

What is not implemented of the paper: the attentional poolers (CoCa pools the image tokens into one
contrastive and 256 captioning queries; lipkit's decoder cross-attends to the tower's token grid and the
contrastive embedding is the tower's own), the unimodal text decoder feeding the multimodal one (lipkit's
decoder embeds the tokens itself: see models.caption_decoder), and CoCa's JFT classification pre-training.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.objectives.infonce import InfoNCE


class CaptionContrast(nn.Module):
    inputs = ("image_features", "text_features", "logit_scale", "caption_nll", "caption_tokens")

    def __init__(self, caption_weight: float = 2.0, contrastive_weight: float = 1.0) -> None:
        """λ of the captioning loss and w of the contrastive one."""
        super().__init__()
        for name, w in (("caption_weight", caption_weight), ("contrastive_weight", contrastive_weight)):
            if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
                raise ValueError(f"{name} must be a number ≥ 0, got {w!r}")
        self.caption_weight, self.contrastive_weight = float(caption_weight), float(contrastive_weight)
        self.infonce = InfoNCE()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        caption_nll: torch.Tensor | None = None,
        caption_tokens: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if caption_nll is None or caption_tokens is None:
            raise ValueError("the captioning term reads caption_nll and caption_tokens")
        cap = caption_nll.sum() / caption_tokens.sum().clamp(min=1).to(caption_nll.dtype)
        self.last_stats = {"caption_loss": cap.detach()}
        loss = self.caption_weight * cap
        if self.contrastive_weight:
            loss = loss + self.contrastive_weight * self.infonce(image_features, text_features, logit_scale)
        return loss
