"""Script ordering, in the spirit of TVTS (Zeng et al., 2023, "Learning Transferable Spatiotemporal
Representations from Natural Script Knowledge"): beside the contrastive loss, the clip embedding must tell
in which order the sentences of its script happen — something an order-blind clip embedding cannot do.

Each training clip has its caption and K sentences describing it in time order: a list column
[caption, s_1, …, s_K] read as the captions (data.caption_column: script, data.captions_per_image: K + 1,
data.caption_policy: first; `lipkit data build motion` writes one): the contrast reads each clip's first
caption, the ordering its other K (input `script_features`). With v the clip's normalised embedding
and u_k sentence k's (both from the model), a small head of the objective scores each sentence's position:

    p(j | v, u_k) = softmax_j( W₂ GELU(W₁ [v ; u_k ; v ⊙ u_k]) ),   j = 1 … K
    L = InfoNCE(v, caption) + λ · mean_{clips, k} −log p(k | v, u_k)           (λ = `order_weight`)

A clip and its time reverse have the same sentences in reverse order; mean pooling embeds the two alike,
so for sentences that change place the second term stays at log 2 or above; a temporal head can lower it.

Not implemented: TVTS's joint transformer over the video tokens and the shuffled transcripts (it sorts them
together; here each sentence's position is predicted on its own from the clip embedding), its masked video
modelling branch, and ASR transcripts of consecutive clips as scripts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE, WidthBound


class ScriptOrder(WidthBound):
    local_form: ClassVar[str | None] = None
    inputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features", "logit_scale", "script_features")

    def __init__(self, sentences: int = 3, order_weight: float = 1.0, width: int = 256) -> None:
        super().__init__()
        if sentences < 2 or order_weight < 0 or width < 1:
            raise ValueError("sentences must be 2 or more, order_weight 0 or more and width 1 or more")
        self.sentences, self.order_weight, self.width = sentences, order_weight, width
        self.head: nn.Sequential | None = None  # sized to the embeddings by bind_model / bind_width
        self.contrast = InfoNCE()

    def bind_width(self, dim: int) -> None:
        self.head = nn.Sequential(
            nn.Linear(3 * dim, self.width), nn.GELU(), nn.Linear(self.width, self.sentences)
        )

    def order_logits(self, clips: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """(B, D) clips and (B, K, D) their sentences → (B, K, K) logits of each sentence's position."""
        if self.head is None:
            raise ValueError("bind_model(model) sizes the position head before the first batch")
        v = clips[:, None].expand_as(sentences)
        return self.head(torch.cat([v, sentences, v * sentences], dim=-1).to(self.head[0].weight.dtype))

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        script_features: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        b, k = script_features.shape[:2]
        if k != self.sentences:
            raise ValueError(
                f"each clip has {k} script sentences and the objective orders {self.sentences}; set "
                f"train.objective_args.sentences={k} (or data.captions_per_image={self.sentences + 1})"
            )
        loss = self.contrast(image_features, text_features, logit_scale)
        logits = self.order_logits(image_features, script_features)
        target = torch.arange(k, device=logits.device).expand(b, -1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return loss + self.order_weight * F.cross_entropy(logits.flatten(0, 1).to(dtype), target.flatten())
