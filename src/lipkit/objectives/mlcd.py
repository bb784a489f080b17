"""Multi-label cluster discrimination beside CLIP's loss, after MLCD (An et al., 2024, "Multi-label Cluster
Discrimination for Visual Representation Learning").

Offline, the training images are clustered into k clusters by their embeddings (`lipkit data cluster
CHECKPOINT SOURCE OUT -k K --labels L`), and each image's L nearest clusters are its positive labels P_i
(`data.cluster_labels: OUT`; −1 entries are no label). During training, with L2-normalised image features
x_i, k learnable class centres w_j (L2-normalised in the loss), s_ij = σ·<x_i, w_j> (σ = `scale`) and
N_i the clusters not in P_i:

    ℓ_i = log(1 + Σ_{j ∈ N_i} exp(s_ij)) + log(1 + Σ_{p ∈ P_i} exp(−s_ip))
    L_mlcd = mean of ℓ_i over the images with at least one label
    L = λ_c · InfoNCE(x, y) + λ_m · L_mlcd            (λ_c = `contrastive_weight`, λ_m = `cluster_weight`)

so every positive cluster's similarity is pushed up and every other one down, with no competition among
an image's positives (the multi-label form MLCD uses instead of a softmax over one label). λ_m = 0 is
InfoNCE exactly; λ_c = 0 trains by cluster discrimination alone ("instead of the contrastive one").

The class centres belong to the objective: optimised by the trainer's AdamW and saved with the training
state (exact resume), not part of the exported model. They are sized at launch from the clustering (k) and
the model (its embedding width) and start as seeded random unit vectors (`seed`). The labels are looked up
by each sample's stable id and gathered with the features, so two ranks see the global batch's labels.

What is not implemented of the paper:
- Negative-class sampling (the paper samples a fraction of the k centres per step, PartialFC-style, for
  k in the millions): here every centre that is not a positive is a negative.
- The clustering at the paper's scale (a million centres over billions of images, with its own feature
  extractor) and its choice of σ and of the number of positive labels (the defaults here, σ = 32 and the
  L written by `lipkit data cluster`, are ours).
- MLCD trains a vision tower alone; here the term sits beside (or instead of) CLIP's contrastive loss of
  the two towers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError
from lipkit.objectives.infonce import InfoNCE


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a label of log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s); `labels` (B, L), −1 pads."""
    b, k = logits.shape
    positive = torch.zeros(b, k + 1, dtype=torch.bool, device=logits.device)
    positive.scatter_(1, torch.where(labels >= 0, labels, k), True)  # −1 → the spare column k
    positive = positive[:, :k]
    zero = torch.zeros(b, 1, dtype=logits.dtype, device=logits.device)  # the "1 +" inside each log
    negatives = torch.logsumexp(torch.cat([zero, logits.masked_fill(positive, float("-inf"))], 1), 1)
    positives = torch.logsumexp(torch.cat([zero, (-logits).masked_fill(~positive, float("-inf"))], 1), 1)
    labelled = positive.any(1)
    per_row = (negatives + positives) * labelled
    return per_row.sum() / labelled.sum().clamp(min=1)


class MultiLabelClusterDiscrimination(nn.Module):
    inputs = ("image_features", "text_features", "logit_scale", "cluster_labels")

    def __init__(
        self,
        scale: float = 32.0,
        contrastive_weight: float = 1.0,
        cluster_weight: float = 1.0,
        num_clusters: int = 0,
        embed_dim: int = 0,
        seed: int = 0,
    ) -> None:
        """`scale` σ of the centre similarities; `contrastive_weight` / `cluster_weight` λ_c / λ_m.
        `num_clusters` and `embed_dim` size the class centres (0: set at launch from data.cluster_labels
        and the model); `seed` draws their initial directions."""
        super().__init__()
        for name, value in {"scale": scale, "contrastive_weight": contrastive_weight}.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")
        if (
            isinstance(cluster_weight, bool)
            or not isinstance(cluster_weight, int | float)
            or cluster_weight < 0
        ):
            raise ValueError(f"cluster_weight must be a number ≥ 0, got {cluster_weight!r}")
        self.scale, self.contrastive_weight = float(scale), float(contrastive_weight)
        self.cluster_weight, self.seed = float(cluster_weight), int(seed)
        self.num_clusters, self.embed_dim = int(num_clusters), int(embed_dim)
        self.infonce = InfoNCE()
        self.centres = nn.Parameter(torch.empty(0))
        if num_clusters and embed_dim:
            self.bind(num_clusters, embed_dim)

    def bind(self, num_clusters: int, embed_dim: int) -> None:
        """Size the class centres: k seeded random unit vectors of the model's embedding width."""
        g = torch.Generator().manual_seed(self.seed)
        self.num_clusters, self.embed_dim = int(num_clusters), int(embed_dim)
        self.centres = nn.Parameter(F.normalize(torch.randn(num_clusters, embed_dim, generator=g), dim=-1))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        saved = state_dict.get(prefix + "centres")
        if saved is not None and saved.shape != self.centres.shape:
            raise UserError(
                f"The checkpoint's {saved.shape[0]} class centres of {saved.shape[1]} dims do not fit this run's "
                f"{self.num_clusters} clusters of {self.embed_dim}; resume with the cluster labels it was started with."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        cluster_labels: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        if self.centres.numel() == 0:  # not bound at launch (a direct call): sized from the inputs
            self.bind(max(int(cluster_labels.max()) + 1, 1), image_features.shape[1])
            self.centres.data = self.centres.data.to(image_features)
        centres = F.normalize(self.centres.to(image_features.dtype), dim=-1)
        cluster = multi_label_loss(self.scale * image_features @ centres.t(), cluster_labels)
        labelled = (cluster_labels >= 0).any(1).double().mean()
        self.last_stats = {"cluster_loss": cluster.detach(), "labelled_share": labelled}
        loss = self.cluster_weight * cluster
        if self.contrastive_weight:
            loss = loss + self.contrastive_weight * self.infonce(image_features, text_features, logit_scale)
        return loss
