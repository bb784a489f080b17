"""VDI's visual-dynamic injection (Luo et al., 2023, "Towards Generalisable Video Moment Retrieval:
Visual-Dynamic Injection to Image-Text Pre-Training"): beside the
contrastive loss, what changes across a clip's frames is aligned with the phrase of its caption that says what
changes, so that the video representation carries the dynamics the words name.

The phrase is found by rules over the caption (data/change_phrases.py; `data.change_phrases: true` puts it
second among the captions, so u_i = the features of clip i's second caption). With s_{i,t} the temporal
head's state of frame t (models/temporal.py; frame_features) and g a learned linear map of the objective:

    δ_i = g(s_{i,T} − s_{i,1}) / ‖·‖                       (the net change over the clip)
    P_ij = 1 when u_i and u_j are the same phrase (cosine > 1 − 1e-4), else 0
    L_dyn = ½ mean_i [ −Σ_j P_ij/|P_i·| log softmax_j(τ δ_i·u_j) − Σ_j P_ji/|P_·i| log softmax_j(τ δ_j·u_i) ]
    L = InfoNCE(clip embeddings, captions) + λ · L_dyn        (τ the model's logit scale, λ `dynamics_weight`)

The net change is taken from the temporal head's states, so with a frozen image tower the term trains the head
(a transformer's states depend on the other frames; mean pooling's states are the frozen frame features, and
only g and the text side learn). Not implemented: VDI's spatial-context term, its use of a trained image
tower on video frames and of a parser for the verb phrases, and moment retrieval (localising the phrase in
time).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE, WidthBound, soft_cross_entropy


def soft_targets_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """½ (rows' + columns' cross-entropy against the uniform distribution over each one's positives)."""
    p = positives.to(logits.dtype)
    rows = soft_cross_entropy(logits, p / p.sum(1, keepdim=True))
    return 0.5 * (rows + soft_cross_entropy(logits.t(), (p / p.sum(0, keepdim=True)).t()))


class VisualDynamics(WidthBound):
    local_form: ClassVar[str | None] = None
    inputs: ClassVar[tuple[str, ...]] = (
        "image_features",
        "text_features",
        "logit_scale",
        "frame_features",
        "text_features_2",
    )
    needs_change_phrases: ClassVar[bool] = True  # train.clip_setup checks data.change_phrases

    def __init__(self, dynamics_weight: float = 1.0) -> None:
        super().__init__()
        if dynamics_weight < 0:
            raise ValueError(f"dynamics_weight must be 0 or more, not {dynamics_weight}")
        self.dynamics_weight = dynamics_weight
        self.g: nn.Linear | None = None  # sized to the embeddings by bind_model / bind_width
        self.contrast = InfoNCE()

    def bind_width(self, dim: int) -> None:
        self.g = nn.Linear(dim, dim)

    def dynamics(self, frame_features: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame states → (B, D) normalised net change."""
        if self.g is None:
            raise ValueError("bind_model(model) sizes the dynamics map before the first batch")
        change = frame_features[:, -1] - frame_features[:, 0]
        return F.normalize(self.g(change.to(self.g.weight.dtype)), dim=-1)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        frame_features: torch.Tensor,
        text_features_2: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        loss = self.contrast(image_features, text_features, logit_scale)
        u = text_features_2
        same = ((u @ u.t()) > 1 - 1e-4) | torch.eye(len(u), dtype=torch.bool, device=u.device)  # own phrase
        logits = logit_scale * self.dynamics(frame_features) @ u.t().to(self.g.weight.dtype)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return loss + self.dynamics_weight * soft_targets_loss(logits.to(dtype), same)
