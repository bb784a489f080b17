"""Image–text matching with in-batch negatives beside a contrastive loss (UNITER's ITM task, Chen et al.,
2020, "UNITER: UNiversal Image-TExt Representation Learning"; negatives drawn from the contrastive
similarities as ALBEF, Li et al., 2021, "Align before Fuse", §3.2 does).

The matching head (models.matching_head) scores a pair s(i, j) from image i's and caption j's token
features. Over the global batch of B pairs (i, i), with c = <f_i, g_j> the contrastive cosines (no
gradient), t the logit scale and j ≁ i when caption j is not word for word image i's caption:

    n_t(i) ~ softmax_{j ≁ i}(t·c_ij)    (each image's negative caption; `negatives: sampled`, ALBEF's)
    n_v(j) ~ softmax_{i ≁ j}(t·c_ij)    (each caption's negative image)
    L_itm  = 1/|P| Σ_{(i,j,y) ∈ P} BCE(σ(s(i, j)), y),
             P = {(i, i, 1)} ∪ {(i, n_t(i), 0)} ∪ {(n_v(j), j, 0)}    (B positives, ≤ 2B negatives)
    L      = w · InfoNCE(image, caption) + λ · L_itm + μ · L_wra
             (w = `contrastive_weight`, λ = `match_weight`, μ = `ot_weight`)

The draws come from a generator seeded by the batch's caption keys (the same on every rank and in one
process); `negatives: hardest` takes each row's / column's argmax instead. The head learns at
`head_lr_scale` (0.1) × train.lr: from scratch at the demo's 1e-3 it collapses to a constant score (the
prior) and stays there; on the hardest negatives alone it learns nothing in its first hundred steps
(docs/reranking.md).

L_wra is UNITER's word–region alignment over the same pairs (objectives.optimal_transport): with D(i, j)
the optimal-transport distance between caption j's words and image i's patches,

    L_wra = 1/|P| ( Σ_{y = 1} D(i, j) − Σ_{y = 0} D(i, j) )      (UNITER's λ_ot = 0.1; lipkit's default 0)

— true pairs pulled together word by patch, negatives pushed apart.

A caption or image with no candidate (every caption of the batch identical) adds no negative.
What differs from the papers: UNITER samples negatives uniformly at random (not offered); lipkit's draws
are seeded by the batch, not a global random state; the logit is a binary score (ALBEF's two-way softmax
over match/no-match is the same function of the logit difference). UNITER computes the OT distance on its
fusion transformer's output states; lipkit on the towers' token features (the head's inputs), so the
alignment shapes the shared embedding space that token-wise scoring and heat maps read. UNITER's MLM and
MRM task is not part of this objective; its MLM is, through the same head (`mlm_weight` > 0,
objectives.fusion_mlm: 15 % of each true pair's caption words masked and predicted from the fused states;
it needs a tokenizer with [MASK], e.g. the demo's MiniLM), so L gains + ν · L_mlm. Every rank scores all
pairs of the global batch (as FILIP's gathered form does): no local form yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.models.matching_head import trim_text
from lipkit.objectives.fusion_mlm import FusionMLM
from lipkit.objectives.infonce import InfoNCE
from lipkit.objectives.optimal_transport import ot_distance


def hard_negatives(
    sims: torch.Tensor, keys: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) image × caption similarities and (B,) caption keys (equal for identical captions) → for each
    image a non-matching caption and for each caption a non-matching image, (B,) each, −1 where there is
    none: the hardest (argmax), or with `scale` t drawn ∝ exp(t·c) (ALBEF) by a generator seeded from the
    keys (the same draw on every rank and in one process)."""
    other = keys[:, None] != keys[None, :]
    masked = sims.detach().float().masked_fill(~other, float("-inf"))
    none_t, none_v = ~other.any(1), ~other.any(0)
    if scale is None:
        text_neg, image_neg = masked.argmax(1), masked.argmax(0)
    else:
        seed = sum(k * 0x9E3779B97F4A7C15 for k in keys.tolist()) % 2**63
        gen = torch.Generator().manual_seed(seed)
        weights = torch.softmax(scale * masked.cpu(), dim=1).nan_to_num(1.0)  # a row without one: any
        text_neg = torch.multinomial(weights, 1, generator=gen)[:, 0].to(sims.device)
        weights = torch.softmax(scale * masked.t().cpu(), dim=1).nan_to_num(1.0)
        image_neg = torch.multinomial(weights, 1, generator=gen)[:, 0].to(sims.device)
    return text_neg.masked_fill(none_t, -1), image_neg.masked_fill(none_v, -1)


def matching_pairs(
    sims: torch.Tensor, keys: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, caption index, label) of every pair of P: positives first, then each image's
    negative caption, then each caption's negative image (`hard_negatives`)."""
    b = sims.shape[0]
    own = torch.arange(b, device=sims.device)
    text_neg, image_neg = hard_negatives(sims, keys, scale)
    t_ok, v_ok = text_neg >= 0, image_neg >= 0
    images = torch.cat([own, own[t_ok], image_neg[v_ok]])
    texts = torch.cat([own, text_neg[t_ok], own[v_ok]])
    labels = torch.cat([sims.new_ones(b), sims.new_zeros(int(t_ok.sum()) + int(v_ok.sum()))])
    return images, texts, labels


class ImageTextMatching(nn.Module):
    inputs = (
        "image_features",
        "text_features",
        "logit_scale",
        "image_tokens",
        "text_tokens",
        "text_mask",
        "text_key",
        "match_head",
    )

    def __init__(
        self,
        match_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        ot_weight: float = 0.0,
        negatives: str = "sampled",
        head_lr_scale: float = 0.1,
        mlm_weight: float = 0.0,
        mlm_mask: float = 0.15,
    ) -> None:
        """λ of the matching loss, w of the contrastive one, μ of the word–patch OT term; how negatives are
        mined: "sampled" (∝ softmax of the scaled cosines, ALBEF) or "hardest"; the matching head's learning
        rate as a multiple of train.lr; ν of UNITER's MLM through the head and its masking rate."""
        super().__init__()
        if negatives not in ("hardest", "sampled"):
            raise ValueError(f"negatives must be 'hardest' or 'sampled', got {negatives!r}")
        if (
            isinstance(head_lr_scale, bool)
            or not isinstance(head_lr_scale, int | float)
            or not 0 < head_lr_scale <= 10
        ):
            raise ValueError(f"head_lr_scale must be a number in (0, 10], got {head_lr_scale!r}")
        self.negatives, self.head_lr_scale = negatives, float(head_lr_scale)
        self.lr_scales = {"matcher.": float(head_lr_scale)}  # train.optim: the head's parameter group
        weights = {
            "match_weight": match_weight,
            "contrastive_weight": contrastive_weight,
            "ot_weight": ot_weight,
            "mlm_weight": mlm_weight,
        }
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf"):
                raise ValueError(f"{name} must be a number ≥ 0, got {w!r}")
        self.match_weight, self.contrastive_weight = float(match_weight), float(contrastive_weight)
        self.ot_weight, self.mlm_weight, self.mlm_mask = float(ot_weight), float(mlm_weight), mlm_mask
        self.infonce = InfoNCE()
        self.mlm = FusionMLM(mlm_mask) if mlm_weight else None
        if self.mlm is not None:  # the masks are seeded by the step (kept in the training state for resumes)
            self.inputs = (*type(self).inputs, "model", "text_ids")
            self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def bind_tokenizer(self, tokenizer: object) -> None:
        if self.mlm is not None:
            self.mlm.bind_tokenizer(tokenizer)

    def bind_model(self, model: nn.Module) -> None:
        """UNITER's MLM output layer at the matching head's width (none without the term). No momentum model."""
        if self.mlm is not None and getattr(model, "has_matcher", False):
            self.mlm.bind_model(model)  # without a head the trainer's input check refuses the run

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_key: torch.Tensor | None = None,
        match_head: nn.Module | None = None,
        model: nn.Module | None = None,
        text_ids: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if image_tokens is None or text_tokens is None or text_mask is None or text_key is None:
            raise ValueError("the matching term reads image_tokens, text_tokens, text_mask and text_key")
        if match_head is None:
            raise ValueError("the matching term reads the model's match_head")
        scale = float(logit_scale.detach()) if self.negatives == "sampled" else None
        images, texts, labels = matching_pairs(image_features @ text_features.t(), text_key, scale)
        tokens, mask = trim_text(text_tokens, text_mask)
        logits = match_head(image_tokens[images], tokens[texts], mask[texts])
        match = F.binary_cross_entropy_with_logits(logits, labels)
        accuracy = ((logits > 0) == (labels > 0)).float().mean()
        self.last_stats = {"match_loss": match.detach(), "match_accuracy": accuracy.detach()}
        loss = self.match_weight * match
        if self.ot_weight:
            d = ot_distance(tokens[texts], mask[texts], image_tokens[images])
            positive = labels > 0
            loss = loss + self.ot_weight * (d[positive].sum() - d[~positive].sum()) / len(d)
            negative = d[~positive].mean() if (~positive).any() else d.new_zeros(())  # all one caption: none
            self.last_stats.update(ot_positive=d[positive].mean().detach(), ot_negative=negative.detach())
        if self.mlm is not None:
            assert model is not None and text_ids is not None, (
                "the MLM term reads the model and the token ids"
            )
            mlm, mlm_accuracy = self.mlm(model, match_head, image_tokens, text_ids, int(self.steps_seen))
            loss = loss + self.mlm_weight * mlm
            self.last_stats.update(mlm_loss=mlm.detach(), mlm_accuracy=mlm_accuracy.detach())
            if torch.is_grad_enabled():
                self.steps_seen += 1
        if self.contrastive_weight:
            loss = loss + self.contrastive_weight * self.infonce(image_features, text_features, logit_scale)
        return loss
