"""SigLIP's loss plus ConceptCLIP's region–concept alignment (Nie et al., 2025, "ConceptCLIP: Towards
Trustworthy Medical AI via Concept-Enhanced Contrastive Language-Image Pre-training", arXiv:2501.15579: the
RC-Align term beside the IT-Align one, as lipkit reads it).

Each caption j names concepts k (a list column of the table; `concepts_column`): phrases of the caption. A
concept's feature c_jk is the mean of the caption's normalised token features over the tokens spelling it
(train.concepts finds the span by token ids), normalised; v_ip are the image's normalised patch tokens. The
concept-level similarity of image i and caption j lets each concept find its best patch:

    s_ij = 1/|K_j| Σ_{k ∈ K_j} max_p <v_ip, c_jk>          (K_j: caption j's concepts it spells)
    u_ij = t_c · s_ij + b_c,        z_ij = +1 if i = j else −1
    L_RC = −1/B Σ_i Σ_{j : K_j ≠ ∅} log σ(z_ij · u_ij)
    L    = SigLIP(image, caption) + α · L_RC                          (α = `concept_weight`)

with t_c = exp(concept_log_scale) (clamped at 100) and b_c the objective's own learned scale and bias,
initialised like SigLIP's (t_c = 10, b_c = −10). s_ij is FILIP's text-to-image similarity over concepts
instead of words (objectives.filip.filip_similarity). The image–text term uses the model's logit bias,
which training adds to the model for this objective. α = 0 is SigLIP exactly.

What is not implemented of the paper:
- Concept extraction: the paper links caption phrases to UMLS medical concepts with an entity linker and
  builds its MedConcept-23M corpus; here the concepts come from the table, and a concept that is not a phrase
  of the drawn caption sits that step out.
- The paper's concept-aware inference and explanation heads (concept bottleneck scores on downstream
  tasks); heat maps per concept are lipkit's generic ones (eval.heatmaps).
- α defaults to 1 here; it is lipkit's default, not a value taken from the paper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.filip import filip_similarity
from lipkit.objectives.sigmoid import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, SigmoidLoss

MAX_CONCEPT_SCALE = 100.0


def concept_similarity(
    image_tokens: torch.Tensor, concept_features: torch.Tensor, concept_valid: torch.Tensor
) -> torch.Tensor:
    """(B_img, N, D) normalised patch tokens, (B_txt, K, D) concept features, (B_txt, K) validity →
    (B_img, B_txt) s_ij, each concept's best patch averaged over the caption's valid concepts."""
    return filip_similarity(image_tokens, concept_features, concept_valid)[1]


def concept_alignment(
    similarity: torch.Tensor, has_concepts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """(B, B) s_ij, (B,) whether caption j has a valid concept, scale t_c and bias b_c → L_RC (0, with its
    graph, when no caption has one; no host sync)."""
    logits = scale * similarity + bias
    signs = 2 * torch.eye(similarity.shape[0], dtype=logits.dtype, device=logits.device) - 1
    terms = -F.logsigmoid(signs * logits) * has_concepts[None, :].to(logits.dtype)
    return terms.sum() / similarity.shape[0]


class ConceptAlignment(nn.Module):
    inputs = (
        "image_features",
        "text_features",
        "logit_scale",
        "logit_bias",
        "image_tokens",
        "concept_features",
        "concept_valid",
    )

    def __init__(self, concept_weight: float = 1.0, concepts_column: str = "concepts") -> None:
        """`concept_weight` α of the concept term; the table column holding each row's concepts."""
        super().__init__()
        w = concept_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ValueError(f"concept_weight must be a number ≥ 0, got {w!r}")
        if not isinstance(concepts_column, str) or not concepts_column:
            raise ValueError(f"concepts_column must be a column name, got {concepts_column!r}")
        self.concept_weight, self.concepts_column = float(w), concepts_column
        self.concept_log_scale = nn.Parameter(torch.tensor(math.log(INIT_LOGIT_SCALE)))
        self.concept_bias = nn.Parameter(torch.tensor(INIT_LOGIT_BIAS))
        self.siglip = SigmoidLoss()

    def concept_scale(self) -> torch.Tensor:
        return self.concept_log_scale.exp().clamp(max=MAX_CONCEPT_SCALE)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        concept_features: torch.Tensor | None = None,
        concept_valid: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = self.siglip(image_features, text_features, logit_scale, logit_bias)
        if image_tokens is None or concept_features is None or concept_valid is None:
            raise ValueError("the concept term reads image_tokens, concept_features and concept_valid")
        has = concept_valid.any(1)
        s = concept_similarity(image_tokens, concept_features, concept_valid)
        rc = concept_alignment(s, has, self.concept_scale().to(s.dtype), self.concept_bias.to(s.dtype))
        self.last_stats = {"concept_loss": rc.detach(), "concept_share": has.float().mean().detach()}
        return loss + self.concept_weight * rc
