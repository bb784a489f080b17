"""EZ-CLIP's temporal visual prompts (Ahmad et al., 2023, "EZ-CLIP: Efficient Zero-Shot Video Action
Recognition"; read against the authors' code, github Shahzadnit/EZ-CLIP, clip/model.py): a frozen image ViT
made to see time by one learned prompt token per frame and layer, plus small adapters. Model `temporal:
ezclip` on lipkit's own ViT tower (model vision_tower vit, no attentional pooler).

For a clip's frames x_t (each a token sequence), in every block ℓ of the frozen tower:

    z_t   = P_ℓ,t + mean_n x_t,n                            (P: L × T × W learned prompts; n over the class
                                                             token and the patches, as the reference code)
    z'    = Attn_ℓ(LN1_ℓ(z))                                (the block's own frozen attention, over the T frames)
    x_t  ← x_t + Attn_ℓ(LN1_ℓ([x_t ; z'_t]))[:N]            (the prompt is one more key/value, then dropped)
    x_t  ← x_t + A_ℓ(x_t),  A_ℓ(h) = W₂ GELU(W₁ h)          (adapter, width W/4, W₂ zero-initialised)
    x_t  ← x_t + MLP_ℓ(LN2_ℓ(x_t))

then the tower's own ln_post and projection give frame embeddings e_t, and the clip embedding is their mean.
Trainable: the prompts (init U(±√(6 / (3·p² + W))), p the patch size) and the adapters; the tower frozen.
EZ-CLIP's motion loss on the e_t is `objectives/ezclip.py`.

Not implemented: EZ-CLIP's text-tower adapters (lipkit trains the text projection instead, LiT-style, which
also works with a Hugging Face text tower), prompt dropout and drop-path, its GPT-written class
descriptions, and ActionCLIP's KL loss (lipkit's InfoNCE is used). Unlike the other temporal heads, the
prompt token changes every frame's attention, so a one-frame clip is not the image model's embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError
from lipkit.models.temporal import TemporalHead


class Adapter(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width // 4)
        self.fc2 = nn.Linear(width // 4, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class FramePrompts(TemporalHead):
    """EZ-CLIP's prompts and adapters for a ViT of `layers` blocks of `width`, clips of up to `frames` frames;
    as a temporal head, the prompted tower's frame embeddings are its states and their mean the clip's."""

    def __init__(self, width: int, layers: int, frames: int, patch: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.prompts = nn.Parameter(torch.empty(layers, frames, width).uniform_(-bound, bound))
        self.adapters = nn.ModuleList(Adapter(width) for _ in range(layers))

    def frames(self, vit: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        """Clips (B, T, 3, S, S) through the prompted tower → frame embeddings (B, T, D), not normalised."""
        b, t = clips.shape[:2]
        blocks = vit.transformer.resblocks
        if hasattr(vit, "attn_pool") or len(blocks) != self.prompts.shape[0]:
            raise UserError(
                "EZ-CLIP prompts (model temporal ezclip) need lipkit's ViT without an attentional pooler."
            )
        if t > self.prompts.shape[1]:
            raise UserError(
                f"EZ-CLIP has prompts for {self.prompts.shape[1]} frames, not {t}; lower data.num_frames or train "
                f"with model.overrides.temporal_frames={t}."
            )
        x = vit.embed(clips.flatten(0, 1))  # (B·T, 1 + N, W)
        for layer, block in enumerate(blocks):
            z = self.prompts[layer, :t].to(x.dtype) + x.mean(1).unflatten(0, (b, t))  # (B, T, W)
            z = block.attn(block.ln_1(z)).flatten(0, 1)[:, None]  # across the frames; one token per frame
            h = torch.cat([x, z], dim=1)
            x = x + block.attn(block.ln_1(h))[:, :-1]
            x = x + self.adapters[layer](x)
            x = x + block.mlp(block.ln_2(x))
        pooled = vit.ln_post(x)[:, 0] @ vit.proj
        return pooled.unflatten(0, (b, t))
