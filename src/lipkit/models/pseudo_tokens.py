"""PTUnifier's pseudo-token pools (Chen et al., 2023, "Towards Unifying Medical Vision-and-Language
Pre-training via Soft Prompts", §3.2): one fusion model takes image-only, text-only or paired input by
filling the missing modality with soft prompts chosen from a pool.

Two pools of `size` vectors in the shared embedding space, P_v (pseudo image tokens) and P_t (pseudo caption
tokens), drawn from N(0, 0.02²). For an input that lacks one modality, the present one's token features
x_1 … x_n (the tower's normalised outputs; a caption's real tokens after its start token, as the
reference code skips [CLS]) give the query q = mean_k x_k, and

    pseudo(q, P, k) = [P_{j_1}; …; P_{j_k}],    j_1 … j_k = top-k_j (q · P_j)     (best first)

stands in for the missing tokens: k_v = 49 image tokens for a caption alone, k_t = 32 caption tokens (all
real) for an image alone. The fusion (models.matching_head's [CLS; caption; image] sequence) then runs
unchanged, and its final [CLS] state is one representation for all three kinds of input (`fused_cls`).
The selection is not differentiable in q (the top-k indices); the chosen pool rows are (the reference
code looks them up without gradient, so its pools never train: adapt.ptunifier's `freeze_pools`).

What differs from the paper: its pools sit at the *input* of the towers (pseudo tokens are encoded by the
missing modality's encoder, then fused by co-attention layers), and the query is the mean of the present
modality's input embeddings; here the towers are a dual encoder's, so the pools sit at the fusion head's input
in the shared embedding space, where a caption's mean feature and a pool of image-token vectors can be
compared directly, and the query is the mean of the tower's output features. The paper wraps pseudo caption
tokens in [CLS]/[SEP] and puts a vision [CLS] before pseudo image tokens, and represents an input by two
pooled [CLS] states of its two-stream fusion; here the pseudo tokens stand alone and the single-stream
head's one [CLS] is the representation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL_SIZE = 2048  # the paper's pools
IMAGE_TOKENS = 49  # k_v: pseudo image tokens for a caption alone
TEXT_TOKENS = 32  # k_t: pseudo caption tokens for an image alone


def pseudo_tokens(query: torch.Tensor, pool: torch.Tensor, k: int) -> torch.Tensor:
    """(B, D) queries and an (S, D) pool → (B, k, D): each query's k pool rows of largest dot product, best
    first (PTUnifier's `find_pseudo_tokens`)."""
    chosen = (query.to(pool.dtype) @ pool.t()).topk(k, dim=-1).indices
    return pool[chosen]


class PseudoTokenPools(nn.Module):
    """P_v and P_t (module docstring) and the completion of an input that lacks one modality."""

    def __init__(
        self,
        dim: int,
        size: int = POOL_SIZE,
        image_tokens: int = IMAGE_TOKENS,
        text_tokens: int = TEXT_TOKENS,
    ) -> None:
        super().__init__()
        for name, n in (
            ("pool size", size),
            ("pseudo image tokens", image_tokens),
            ("pseudo text tokens", text_tokens),
        ):
            if n < 1:
                raise ValueError(f"{name} must be at least 1, got {n}")
        if max(image_tokens, text_tokens) > size:
            raise ValueError(f"a pool of {size} cannot give {max(image_tokens, text_tokens)} distinct tokens")
        self.image_k, self.text_k = image_tokens, text_tokens
        self.image_pool = nn.Parameter(torch.randn(size, dim) * 0.02)
        self.text_pool = nn.Parameter(torch.randn(size, dim) * 0.02)

    def complete(
        self,
        image_tokens: torch.Tensor | None,
        text_tokens: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image tokens (B, N, D), caption tokens (B, L, D), their (B, L) real-token mask) with the missing
        modality (None) filled by pseudo tokens; paired input is returned as it is."""
        if image_tokens is None and text_tokens is None:
            raise ValueError("PTUnifier's fusion needs an image, a caption or both")
        if text_tokens is None:
            assert image_tokens is not None
            return (image_tokens, *self.pseudo_caption(image_tokens.mean(1).to(image_tokens.dtype)))
        if text_mask is None:
            text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
        if image_tokens is None:
            words = slice(1, None) if text_tokens.shape[1] > 1 else slice(None)  # after the start token
            query = masked_mean(text_tokens[:, words], text_mask[:, words])
            image_tokens = pseudo_tokens(query, self.image_pool, self.image_k).to(text_tokens.dtype)
        return image_tokens, text_tokens, text_mask

    def pseudo_caption(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image queries → (k_t pseudo caption tokens (B, k_t, D) in the query's dtype, their
        all-real mask)."""
        pseudo = pseudo_tokens(query, self.text_pool, self.text_k).to(query.dtype)
        return pseudo, torch.ones(pseudo.shape[:2], dtype=torch.bool, device=pseudo.device)


def masked_mean(tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens and a (B, N) bool mask → (B, D) the mean of the kept tokens (0 where none is)."""
    weight = keep.to(tokens.dtype)[..., None]
    return (tokens * weight).sum(1) / weight.sum(1).clamp_min(1)


def fused_cls(
    model: nn.Module,
    image_tokens: torch.Tensor | None = None,
    text_tokens: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The matching head's final [CLS] state (B, width) for image-only, caption-only or paired token features
    (normalised, in the shared space), the missing modality filled from `model.adapter`'s pools."""
    pools = getattr(model, "adapter", None)
    if not isinstance(pools, PseudoTokenPools) or not getattr(model, "has_matcher", False):
        raise ValueError("fused features need a model adapted with `lipkit adapt --method ptunifier`")
    return model.matcher.fuse(*pools.complete(image_tokens, text_tokens, text_mask))[:, 0]


@torch.no_grad()
def encode_fused(
    model: nn.Module, images: torch.Tensor | None = None, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised pixels (B, 3, S, S) and/or token ids (B, L) → (B, width) L2-normalised fused [CLS]
    features (`fused_cls`) of image-only, caption-only or paired input, float32."""
    image_tokens = text_tokens = mask = None
    if images is not None:
        _, tokens = model.visual(images.to(model.device), return_tokens=True)
        image_tokens = F.normalize(tokens, dim=-1)
    if ids is not None:
        ids = ids.to(model.device)
        mask = ids != model.spec.pad_id
        last = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        _, tokens = model.text(ids, return_tokens=True)
        text_tokens, mask = F.normalize(tokens, dim=-1)[:, :last], mask[:, :last]
    return F.normalize(fused_cls(model, image_tokens, text_tokens, mask).float(), dim=-1)
