"""Evaluation with FILIP's token-wise similarity instead of pooled embeddings.

A model trained with the `filip` objective learned token features whose late interaction scores pairs;
its pooled embeddings were never trained for retrieval, so it is evaluated the way it was trained
(Yao et al., 2021): with L2-normalised image tokens x_ik and the real text tokens y_jr,

    s^I_ij = 1/N Σ_k max_r <x_ik, y_jr>      (image → text ranking, zero-shot class scores)
    s^T_ij = 1/|R_j| Σ_r max_k <x_ik, y_jr>  (text → image ranking)

A zero-shot class scores the mean of s^I over its prompt templates. `eval.similarity` picks this
(`filip`) or the pooled cosine (`dense`); `auto` uses it for checkpoints trained with `filip`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lipkit.data.image_store import ImageStore
from lipkit.models.dual_encoder import DualEncoder
from lipkit.objectives.filip import filip_similarity
from lipkit.objectives.wukong import kept_tokens
from lipkit.text.tokenizer import TextTokenizer


@torch.no_grad()
def image_tokens(
    model: DualEncoder, store: ImageStore, batch_size: int, keep: int | None = None
) -> torch.Tensor:
    """(N_images, N_tokens, D) normalised image token features, float32 on the CPU; with `keep`, only the
    `keep` tokens of each image most aligned with its mean token (objectives.wukong.kept_tokens)."""
    n = len(store.records)
    return torch.cat(
        [
            image_token_batch(model, store.get(range(s, min(n, s + batch_size))), keep)
            for s in range(0, n, batch_size)
        ]
    )


def image_token_batch(model: DualEncoder, images_u8: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """uint8 (B, 3, S, S) at the model's size → (B, N_tokens, D) normalised token features, float32 on the
    CPU (what evaluation, `lipkit embed` and a token-wise index compare)."""
    return pooled_and_tokens(model, images_u8, keep)[1]


@torch.no_grad()
def pooled_and_tokens(
    model: DualEncoder, images_u8: torch.Tensor, keep: int | None = None, normalize_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image-tower pass: (B, D) normalised pooled embeddings and (B, N_tokens, D) normalised (or, with
    `normalize_tokens` off, as the tower gives them) token features (`keep`: objectives.wukong.kept_tokens),
    float32 on the CPU."""
    from lipkit.data.transforms import normalize

    x = normalize(images_u8, model.spec.image_mean, model.spec.image_std)
    pooled, tokens = model.visual(x.to(model.device), return_tokens=True)
    tokens = F.normalize(tokens.float(), dim=-1) if normalize_tokens else tokens.float()
    return F.normalize(pooled, dim=-1).float().cpu(), kept_tokens(tokens, keep).cpu()


@torch.no_grad()
def text_tokens(
    model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised token features (T, L, D), real-token mask (T, L)), trimmed to the longest caption."""
    ids = tokenizer(list(texts))
    mask = ids != model.spec.pad_id
    length = int(mask.sum(1).max()) if len(texts) else 1
    feats = []
    for s in range(0, len(texts), batch_size):
        _, tokens = model.text(ids[s : s + batch_size].to(model.device), return_tokens=True)
        feats.append(F.normalize(tokens.float(), dim=-1).cpu()[:, :length])
    mask = mask[:, :length]
    return torch.cat(feats), mask


def pair_scores(
    img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s^I, s^T), each (N_images, N_texts)."""
    return filip_similarity(img_tokens, txt_tokens, txt_mask)


def class_scores(
    img_tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor, n_templates: int
) -> torch.Tensor:
    """(N_images, C): s^I averaged over each class's `n_templates` prompts (prompts class-major)."""
    s_image, _ = filip_similarity(img_tokens, prompt_tokens, prompt_mask)
    return s_image.view(s_image.shape[0], -1, n_templates).mean(2)
