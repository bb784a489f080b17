"""CLIP's loss plus CLOC's region–text contrast (Chen et al., 2024, "Contrastive Localized Language-Image
Pre-Training", arXiv:2410.02746: the region-text contrastive term of its localisation-enhanced objective).

Each image i has regions j with boxes and one caption each (two list columns of the table; `lipkit data
build canvases` writes `boxes` and `object_captions`). A region's embedding r is pooled from the image
tower's token grid inside its box (models.regions: RoIAlign, then the mean) and L2-normalised; its caption's
y is the text tower's normalised embedding. Over the M regions of the global batch, with logit scale t (the
model's, shared with the image–text term) and E_ab = [caption a and caption b are the same token ids]:

    L_reg = ½ [ −1/M Σ_a log( e^{t<r_a, y_a>} / Σ_b∉E_a∖{a} e^{t<r_a, y_b>} )
              − 1/M Σ_a log( e^{t<y_a, r_a>} / Σ_b∉E_a∖{a} e^{t<y_a, r_b>} ) ]
    L = InfoNCE(image, caption) + λ · L_reg                                   (λ = `region_weight`)

so a region is pulled to its own caption and pushed from the other regions' captions, except captions
equal to its own (the same object named in two images is not a negative). λ = 0 is InfoNCE exactly.

What is not implemented of the paper:
- CLOC's Prompter (a light transformer that turns image tokens and a box's positional prompt into the
  region embedding): regions are RoIAlign-pooled here, which the paper's ablation lists as its baseline.
- The grounding term (regressing a box from a region caption) and the paper's VESL pipeline that makes
  region captions with an open-vocabulary detector; the boxes and captions come from the table.
- Box augmentation: the boxes are fractions of the square image the model sees, so training refuses
  geometric augmentation (random crops, rotation, mirroring); colour jitter and blur are allowed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.objectives.infonce import InfoNCE


def region_contrast(
    regions: torch.Tensor, texts: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """(M, D) normalised region and caption features, (M,) caption keys → L_reg (see the module doc)."""
    logits = logit_scale * regions @ texts.t()
    same = keys[:, None] == keys[None, :]
    own = torch.eye(len(keys), dtype=torch.bool, device=keys.device)
    logits = logits.masked_fill(same & ~own, float("-inf"))
    target = torch.arange(len(keys), device=keys.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class RegionContrast(nn.Module):
    def __init__(
        self,
        region_weight: float = 1.0,
        boxes_column: str = "boxes",
        captions_column: str = "object_captions",
    ) -> None:
        """`region_weight` λ of the region term; the table columns holding each row's boxes and their
        captions."""
        super().__init__()
        w = region_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ValueError(f"region_weight must be a number ≥ 0, got {w!r}")
        for name, col in (("boxes_column", boxes_column), ("captions_column", captions_column)):
            if not isinstance(col, str) or not col:
                raise ValueError(f"{name} must be a column name, got {col!r}")
        self.region_weight = float(w)
        self.boxes_column, self.captions_column = boxes_column, captions_column
        self.region_columns = (boxes_column, captions_column)  # launch reads the regions of these columns
        self.inputs = ("image_features", "text_features", "logit_scale")
        if self.region_weight:
            self.inputs += ("region_features", "region_text_features", "region_valid", "region_text_key")
        self.infonce = InfoNCE()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        region_features: torch.Tensor | None = None,
        region_text_features: torch.Tensor | None = None,
        region_valid: torch.Tensor | None = None,
        region_text_key: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        loss = self.infonce(image_features, text_features, logit_scale)
        if not self.region_weight:
            return loss
        if region_features is None or region_text_features is None or region_valid is None:
            raise ValueError("the region term reads region_features, region_text_features and region_valid")
        valid = region_valid.reshape(-1)
        if not bool(valid.any()):  # no region in the whole batch: the term is 0 (and keeps the graph)
            self.last_stats = {}
            return loss + 0.0 * region_features.sum()
        d = region_features.shape[-1]
        reg = region_contrast(
            region_features.reshape(-1, d)[valid],
            region_text_features.reshape(-1, d)[valid],
            region_text_key.reshape(-1)[valid],
            logit_scale,
        )
        self.last_stats = {"region_loss": reg.detach()}
        return loss + self.region_weight * reg
