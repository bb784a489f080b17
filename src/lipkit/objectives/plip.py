"""Identity-based contrast and attribute prediction, after PLIP (Zuo et al., 2023, "PLIP: Language-Image
Pre-training for Person Representation Learning"): its identity-based vision-language contrast (IVLC —
images and texts of the same person are positives of each other) and an attribute-prediction head.

With L2-normalised image features x_i, first-caption features y_j, logits t·<x_i, y_j>, the identity
id_i of each sample (the table column `identity`; a row without one is its own identity) and
P_ij = [id_i = id_j]:

    L_i2t = −1/B Σ_i Σ_j (P_ij / Σ_j' P_ij') log softmax_j(t·<x_i, y_·>)
    L_t2i = −1/B Σ_j Σ_i (P_ij / Σ_i' P_i'j) log softmax_i(t·<x_·, y_j>)
    attributes a = 1..A (table columns `attributes`, each with its own classes): a linear head
        z_a = W_a x_i + b_a on the image feature,  L_attr = 1/A Σ_a mean over rows with a value of CE(z_a, v_ia)
    L = ½ (L_i2t + L_t2i) + λ · L_attr            (λ = `attribute_weight`)

With every identity distinct and no attribute, L is CLIP's InfoNCE exactly. The identity and attribute
values are read from the training table per sample key (train.sample_labels, gathered with the features);
the heads belong to the objective (optimised, saved with the training state, not exported), sized at
launch to each column's classes, seeded.

What is not implemented of the paper:
- PLIP's attribute prediction is image-guided prediction of masked attribute *phrases in the text*
  (through a cross-modal decoder); here it is a classifier over attribute columns of the table.
- Text-guided image colorization, the SYNTH-PEDES data and its generation, and the person-specific
  backbones. PLIP's pseudo-captions have a stand-in: `lipkit data pseudo-caption` (docs/curation.md).
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError


def identity_targets(identity: torch.Tensor) -> torch.Tensor:
    """(B, B) row-normalised targets: 1/|P_i| on the samples sharing i's identity (−1: only i itself)."""
    b = identity.shape[0]
    own = torch.arange(b, device=identity.device)
    ids = torch.where(identity >= 0, identity, -1 - own)  # a missing identity is unique to its row
    same = (ids[:, None] == ids[None, :]).to(torch.get_default_dtype())
    return same / same.sum(1, keepdim=True)


class IdentityContrast(nn.Module):
    def __init__(
        self, identity: str = "", attributes: list[str] | None = None, attribute_weight: float = 1.0
    ) -> None:
        """`identity`: the table column naming each sample's identity ("" for none: every sample its own).
        `attributes`: table columns whose values a linear head predicts from the image, weighted by
        `attribute_weight`."""
        super().__init__()
        attributes = list(attributes or [])
        if not isinstance(identity, str) or any(not isinstance(a, str) or not a for a in attributes):
            raise ValueError(
                "identity must be a column name (or empty) and attributes a list of column names"
            )
        if (
            isinstance(attribute_weight, bool)
            or not isinstance(attribute_weight, int | float)
            or attribute_weight < 0
        ):
            raise ValueError(f"attribute_weight must be a number ≥ 0, got {attribute_weight!r}")
        self.identity, self.attributes, self.attribute_weight = identity, attributes, float(attribute_weight)
        self.label_columns = ([identity] if identity else []) + attributes
        self.inputs = ("image_features", "text_features", "logit_scale") + (
            ("column_labels",) if self.label_columns else ()
        )
        self.heads = nn.ModuleList()

    def bind_columns(self, classes: list[list[str]], embed_dim: int) -> None:
        """One linear head per attribute column, sized to its classes (seeded: the same on every rank); the
        classes' fingerprint is kept with the heads, so a resume on other classes is refused."""
        g = torch.Generator().manual_seed(0)
        digest = hashlib.blake2b(json.dumps(classes[1 if self.identity else 0 :]).encode(), digest_size=8)
        self.register_buffer(
            "vocabulary", torch.tensor(int.from_bytes(digest.digest(), "little", signed=True))
        )
        self.heads = nn.ModuleList()
        for values in classes[1 if self.identity else 0 :]:
            head = nn.Linear(embed_dim, len(values))
            with torch.no_grad():
                head.weight.copy_(torch.randn(len(values), embed_dim, generator=g) / embed_dim**0.5)
                head.bias.zero_()
            self.heads.append(head)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        saved = state_dict.get(prefix + "vocabulary")
        if saved is not None and int(saved) != int(getattr(self, "vocabulary", torch.tensor(0))):
            raise UserError(
                f"The checkpoint's attribute heads were sized to other values of {', '.join(self.attributes)}; "
                "resume on the table it was started with (or start a new run)."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        column_labels: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        b = image_features.shape[0]
        identity = (
            column_labels[:, 0] if self.identity else torch.full((b,), -1, device=image_features.device)
        )
        targets = identity_targets(identity).to(image_features.dtype)
        logits = logit_scale * image_features @ text_features.t()
        i2t = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()  # P is symmetric
        loss = 0.5 * (i2t + t2i)
        if self.attributes and self.attribute_weight:
            if len(self.heads) != len(self.attributes):
                raise ValueError(
                    "the attribute heads are not sized yet: launch binds them to the table's columns"
                )
            first = 1 if self.identity else 0
            terms = []
            for a, head in enumerate(self.heads):
                values = column_labels[:, first + a]
                scores = head(image_features.to(head.weight.dtype))
                terms.append(
                    F.cross_entropy(scores, values.clamp(min=0), reduction="none")[values >= 0].sum()
                    / (values >= 0).sum().clamp(min=1)
                )
            attribute = torch.stack(terms).mean()
            self.last_stats = {"attribute_loss": attribute.detach()}
            loss = loss + self.attribute_weight * attribute
        return loss
