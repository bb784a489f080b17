"""Multi-positive contrastive loss for several captions per image, as used by DreamLIP (Zheng et al.,
2024, "DreamLIP: Language-Image Pre-training with Long Captions"), which takes the multi-positive
InfoNCE of StableRep (Tian et al., 2023, "StableRep: Synthetic Images from Text-to-Image Models Make
Strong Visual Representation Learners").

B L2-normalised images x_i, T L2-normalised captions y_j, caption j belonging to image o_j
(`caption_owner`); P_i = {j : o_j = i} the captions of image i; logits_ij = t · <x_i, y_j>.

    image → text:  L_i2t = −1/|I| Σ_{i ∈ I} Σ_{j ∈ P_i} (1/|P_i|) log softmax_j(logits_i·)
                   (cross entropy against the uniform target over the image's own captions; I are
                   the images with at least one caption)
    text → image:  L_t2i = −1/T Σ_j log softmax_i(logits_·j)_{o_j}      (ordinary cross entropy)
    L = ½ (L_i2t + L_t2i)

An image's other captions are targets, never negatives: the optimum spreads the image's probability
evenly over all of them instead of pushing any away. With T = B and o = arange(B) this is exactly
CLIP's InfoNCE.

`same_text_positive` (off by default) extends the positives to identical texts, as UniCL does for label
captions (Yang et al., 2022, "Unified Contrastive Learning in Image-Text-Label Space"): with k_j the key
of caption j's token ids (`caption_key`), image i and caption j are a positive pair when i owns a
caption with the same text, P_i = {j : ∃ l, o_l = i, k_l = k_j}, and caption j's positives are
Q_j = {i : j ∈ P_i}; then

    L_t2i = −1/T Σ_j Σ_{i ∈ Q_j} (1/|Q_j|) log softmax_i(logits_·j)

(uniform target over Q_j; Q_j = {o_j} without repeated texts, so the formula above is unchanged then).
Identical texts have identical features when the text tower is deterministic, and then the t2i term
equals plain cross entropy over the copies (each copy column is the same softmax), so the change is in
L_i2t: a text repeated by m images of the batch takes m of the image's |P_i| target shares instead of
one — the label caption of a class with many images in the batch weighs more. (Spreading a text's
weight over its copies instead gives back the plain loss exactly.) Measured on the emoji demo with a
label caption (docs/recipes.md): zero-shot accuracy up, retrieval by label down (images of a class draw
together), hence off by default.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class MultiPositiveInfoNCE(nn.Module):
    local_form: ClassVar[str | None] = "rows"  # train.local_losses: each rank its own rows and columns

    def __init__(self, same_text_positive: bool = False) -> None:
        super().__init__()
        if not isinstance(same_text_positive, bool):
            raise ValueError(f"same_text_positive must be true or false, not {same_text_positive!r}")
        self.same_text_positive = same_text_positive
        self.inputs = ("image_features", "text_features", "caption_owner", "logit_scale") + (
            ("caption_key",) if same_text_positive else ()
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        caption_owner: torch.Tensor,
        logit_scale: torch.Tensor,
        caption_key: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        owner = caption_owner.long()
        logits = logit_scale * image_features @ text_features.t()  # (B, T)
        n_images, n_texts = logits.shape
        rows = torch.arange(n_images, device=logits.device)
        if not self.same_text_positive:
            positives = owner[None, :] == rows[:, None]  # (B, T)
            weight = positives.to(logits.dtype)
        else:
            if caption_key is None:
                raise ValueError("same_text_positive needs the caption keys (the trainer passes caption_key)")
            # texts as ids 0..U-1; own[i, u] = 1 when image i owns a caption with text u: O(B·T), no T×T
            uniq, text = caption_key.unique(return_inverse=True)
            own = torch.zeros(n_images, uniq.numel(), device=logits.device, dtype=logits.dtype)
            own.index_put_((owner, text), torch.ones_like(text, dtype=logits.dtype))
            weight = own[:, text]  # (B, T): image i ↔ caption j when i owns j's text
            positives = weight > 0
        counts = weight.sum(dim=1)
        has_caption = counts > 0
        target = weight / counts.clamp(min=1e-12)[:, None]
        i2t = -(target * F.log_softmax(logits, dim=1)).sum()  # rows without captions contribute 0
        i2t = i2t / has_caption.sum().clamp(min=1)
        if self.same_text_positive:
            cols = positives.to(logits.dtype) / positives.sum(0, keepdim=True).to(logits.dtype)
            t2i = -(cols * F.log_softmax(logits, dim=0)).sum() / n_texts
        else:
            t2i = F.cross_entropy(logits.t(), owner)
        return 0.5 * (i2t + t2i)


def positive_weight(
    caption_owner: torch.Tensor,
    caption_key: torch.Tensor | None,
    images: range,
    captions: range,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The positive pairs of the loss above as 0/1 weights, restricted to the images `images` (image
    indices) and the captions `captions` (caption positions): (len(images), len(captions)).

    `caption_owner` and `caption_key` cover every caption of the batch (image j owns caption o_j; keys
    are compared only with `same_text_positive`, i.e. when given). The forward's (B, T) weight is
    `positive_weight(o, k, range(B), range(T))`; a rank of a distributed run asks for its own rows or
    columns against the whole batch (train.local_losses) and holds only len(images)·len(captions) here.
    """
    owner = caption_owner.long()
    rows = torch.arange(images.start, images.stop, device=owner.device)
    chosen = slice(captions.start, captions.stop)
    if caption_key is None:
        return (owner[chosen][None, :] == rows[:, None]).to(dtype)
    _, text = caption_key.unique(return_inverse=True)  # every caption's text as an id 0..U-1
    wanted, column = text[chosen].unique(return_inverse=True)  # the chosen captions' texts, 0..V-1
    slot = torch.full((text.numel(),), -1, dtype=torch.long, device=owner.device)  # U ≤ T ids
    slot[wanted] = torch.arange(wanted.numel(), device=owner.device)
    v, a = slot[text], owner - images.start  # each caption's chosen-text id and image row (or out of range)
    keep = (v >= 0) & (a >= 0) & (a < len(images))
    own = torch.zeros(len(images), wanted.numel(), dtype=dtype, device=owner.device)
    own[a[keep], v[keep]] = 1  # own[i, v] = 1 when image i owns a caption with the chosen text v
    return own[:, column]
