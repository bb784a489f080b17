"""CLIP's loss plus PriorCLIP's affiliation loss over class centres (Pan et al., 2024, "PriorCLIP: Visual
Prior Guided Vision-Language Model for Remote Sensing Image-Text Retrieval": the cluster-based symmetric
contrastive attribution loss, `is_aff_loss` in the authors' code, github.com/jaychempan/PriorCLIP,
`src/open_clip/loss.py`).

Each sample i has a class c_i — its nearest cluster of `lipkit data cluster` (`classes: clusters`, the
first of the labels in data.cluster_labels) or the value of a table column (`classes: COLUMN`); a sample
without one is a class of its own. With L2-normalised image features x_i, first-caption features y_i,
logit scale t and M_ij = [c_i = c_j], each sample's class centres in the batch are the plain means

    Ī_i = Σ_j M_ij x_j / Σ_j M_ij          T̄_i = Σ_j M_ij y_j / Σ_j M_ij      (not re-normalised)

and every image is contrasted with the text centres of the batch's samples, every text with the image
centres, each sample's own column the target:

    L_aff = ½ [ −1/B Σ_i log softmax_j(t·<x_i, T̄_j>)_i  −  1/B Σ_i log softmax_j(t·<y_i, Ī_j>)_i ]
    L = InfoNCE(x, y) + λ · L_aff                                             (λ = `affiliation_weight`)

so an image is pulled toward the mean text of its class and pushed from other classes' means (columns of
samples of the same class repeat the target centre, as in the reference code). λ = 0 is InfoNCE exactly;
with every class distinct, Ī_i = x_i and T̄_i = y_i and L = (1 + λ)·InfoNCE. The classes are looked up by
each sample's stable id and gathered with the features, so the centres are the global batch's.

What is not implemented of the paper:
- The reference code takes the classes from the file names of RSITMD / RSICD (the scene class, e.g.
  `airport_12.tif` → airport); here they come from clustering or a column, which the issue asked for.
- The reference computes the centres per GPU (each rank's local batch) before gathering them; here they
  are the global batch's, so two ranks compute what one process computes.
- The Progressive Attention Encoders (Spatial-PAE's belief matrix with instruction embeddings,
  Temporal-PAE's cyclic activation), the vision-instruction fine-tuning stage and the RS5M pre-training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE


def class_centres(features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, D) → (B, D): row i is the mean of the rows sharing i's class (−1: a class of its own)."""
    own = torch.arange(classes.shape[0], device=classes.device)
    ids = torch.where(classes >= 0, classes, -1 - own)
    same = (ids[:, None] == ids[None, :]).to(features.dtype)
    return (same @ features) / same.sum(1, keepdim=True)


class AffiliationContrast(nn.Module):
    def __init__(self, classes: str = "clusters", affiliation_weight: float = 1.0) -> None:
        """`classes`: "clusters" (data.cluster_labels' nearest cluster) or a table column's name;
        `affiliation_weight` λ of the affiliation term."""
        super().__init__()
        if not isinstance(classes, str) or not classes:
            raise ValueError(f"classes must be 'clusters' or a column name, got {classes!r}")
        w = affiliation_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ValueError(f"affiliation_weight must be a number ≥ 0, got {w!r}")
        self.classes, self.affiliation_weight = classes, float(w)
        self.label_columns = [] if classes == "clusters" else [classes]
        label_input = "cluster_labels" if classes == "clusters" else "column_labels"
        self.inputs = ("image_features", "text_features", "logit_scale", label_input)
        self.infonce = InfoNCE()

    def bind_columns(self, classes: list[list[str]], embed_dim: int) -> None:
        """Nothing to size: the column's values are only compared with each other."""

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        cluster_labels: torch.Tensor | None = None,
        column_labels: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = self.infonce(image_features, text_features, logit_scale)
        if not self.affiliation_weight:
            return loss
        labels = cluster_labels if self.classes == "clusters" else column_labels
        if labels is None:
            raise ValueError(f"the affiliation term reads {self.inputs[-1]}: pass the batch's labels")
        classes = labels[:, 0]
        image_centres = class_centres(image_features, classes)
        text_centres = class_centres(text_features, classes)
        target = torch.arange(image_features.shape[0], device=image_features.device)
        i2t = F.cross_entropy(logit_scale * image_features @ text_centres.t(), target)
        t2i = F.cross_entropy(logit_scale * text_features @ image_centres.t(), target)
        affiliation = 0.5 * (i2t + t2i)
        self.last_stats = {"affiliation_loss": affiliation.detach()}
        return loss + self.affiliation_weight * affiliation
