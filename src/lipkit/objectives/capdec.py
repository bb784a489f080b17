"""Text-only captioning: a decoder trained on noised text embeddings captions image embeddings zero-shot
(Nukrai et al., 2022, "Text-Only Training for Image Captioning using Noise-Injected CLIP" (CapDec); the
noise-injection part of Qiu et al., 2024, "Mining Fine-Grained Image-Text Alignment for Zero-Shot
Captioning via Text-Only Training" (MacCap)).

The decoder (models.caption_decoder, `caption_input: embedding`) reads one vector. In training it is the
first caption's normalised text embedding t_i (detached: the towers do not learn from it) plus Gaussian
noise, and it learns that caption's tokens by teacher forcing:

    z_i = t_i + σ · ε_i,  ε_i ~ N(0, I),   L = Σ_i NLL(caption_i | z_i) / Σ_i T_i

(the mean over every predicted token of the global batch). At inference it reads the normalised image
embedding instead (`lipkit caption`): the noise teaches it a neighbourhood of each text embedding wide
enough to hold the image embeddings across the modality gap. σ is `noise_std`: a number, or "gap" (the
default) — measured before training on up to 1,024 training pairs by the starting model as the per-dimension
RMS of the paired difference, σ² = mean_i ‖x_i − t_i‖² / D, the noise whose expected squared norm equals the
measured gap's (this estimate is lipkit's: CapDec fixes σ, MacCap models the gap as zero-mean Gaussian
noise). ε_i is drawn from a generator seeded by the sample's key and the step (PyTorch keeps 32 bits of
the seed), so 2 ranks draw what 1 process draws and a resumed run draws what the uninterrupted one did.
σ = 0 is the no-noise ablation.

Not implemented: CapDec's fixed σ² = 0.016 is not the default (pass `noise_std: 0.1265` for it); CapDec's
prefix (ClipCap-style GPT-2 prefix) decoder — lipkit's decoder cross-attends to the single vector; MacCap's
region-level noise (noise added to sub-region features, its "fine-grained alignment"), its CLIP-weighted
multiple sampling and filtering at inference, and its language model.
"""

from __future__ import annotations

import torch
from torch import nn


class TextOnlyCaption(nn.Module):
    inputs = ("text_caption_nll", "text_caption_tokens")

    def __init__(self, noise_std: float | str = "gap") -> None:
        """σ of the noise on text embeddings: a number ≥ 0, or "gap" (measured by the starting model)."""
        super().__init__()
        number = isinstance(noise_std, int | float) and not isinstance(noise_std, bool)
        if not (noise_std == "gap" or number and noise_std >= 0):
            raise ValueError(f'noise_std must be "gap" or a number ≥ 0, got {noise_std!r}')
        self.noise_std = noise_std

    def forward(
        self,
        text_caption_nll: torch.Tensor | None = None,
        text_caption_tokens: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if text_caption_nll is None or text_caption_tokens is None:
            raise ValueError("the text-only captioning loss reads text_caption_nll and text_caption_tokens")
        count = text_caption_tokens.sum().clamp(min=1).to(text_caption_nll.dtype)
        return text_caption_nll.sum() / count


def sample_noise(keys: torch.Tensor, step: int, dim: int) -> torch.Tensor:
    """(B, dim) standard normal noise, each row from a generator seeded by its sample key and `step`: the
    same rows whichever rank, batch split or resume draws them."""
    rows = []
    for key in keys.tolist():
        seed = (key * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63)
        rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows) if rows else torch.empty(0, dim)
