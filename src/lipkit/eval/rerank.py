"""Re-ranking a dual encoder's shortlist with its image–text matching head (models.matching_head, trained by
the itm objective): each text query's top-K images by the dense (or token-wise) score are re-ordered by
the head's score of (image, query) and keep the top K places; the images below keep their order.

Used by `lipkit eval` (retrieval/reranked/text_to_image/R@k) and by `lipkit search` / `lipkit serve`
(search.rerank), on the same normalised token features the head was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lipkit.data.image_store import ImageStore
from lipkit.eval import token_similarity
from lipkit.eval.retrieval import recall_at_k
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.matching_head import trim_text
from lipkit.text.tokenizer import TextTokenizer

PAIRS_PER_CALL = 256  # (image, query) pairs fused per head call


@torch.no_grad()
def match_scores(
    model: DualEncoder, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """(P, N, D) image tokens and (P, L, D) caption tokens with their (P, L) mask, pair by pair → (P,)
    matching logits (float32 on the CPU), PAIRS_PER_CALL pairs a call."""
    out = []
    for s in range(0, image_tokens.shape[0], PAIRS_PER_CALL):
        tokens, mask = trim_text(text_tokens[s : s + PAIRS_PER_CALL], text_mask[s : s + PAIRS_PER_CALL])
        img = image_tokens[s : s + PAIRS_PER_CALL]
        device = model.device
        out.append(model.matcher(img.to(device), tokens.to(device), mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def shortlist(scores: torch.Tensor, top: int) -> torch.Tensor:
    """(Q, N) scores → (Q, min(top, N)) indices of each query's best, best first (ties: the lower index,
    as eval.retrieval.recall_at_k ranks)."""
    return scores.argsort(dim=1, descending=True, stable=True)[:, : min(top, scores.shape[1])]


def rerank_text_to_image(
    model: DualEncoder,
    image_tokens: Callable[[torch.Tensor], torch.Tensor],
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    scores: torch.Tensor,
    top: int,
) -> torch.Tensor:
    """`image_tokens(indices)`: those images' (n, T, D) tokens; (Q, L, D) query tokens with (Q, L) mask and
    (Q, N) first-stage scores → (Q, N) float64 scores whose ranking is the re-ranked one: each query's top
    `top` images score above every other image (by the head's logit, in its order), every other image its
    first-stage score."""
    order = shortlist(scores, top)  # (Q, K)
    q, k = order.shape
    step = max(1, PAIRS_PER_CALL // max(1, k))  # queries per call: their K pairs each
    parts = [
        match_scores(
            model,
            image_tokens(order[s : s + step].reshape(-1)),
            text_tokens[s : s + step].repeat_interleave(k, dim=0),
            text_mask[s : s + step].repeat_interleave(k, dim=0),
        ).view(-1, k)
        for s in range(0, q, step)
    ]
    logits = torch.cat(parts).double() if parts else torch.zeros(0, k, dtype=torch.float64)
    out = scores.double().clone()
    if logits.numel():  # lifted above the best first-stage score, whatever its range
        out.scatter_(1, order, logits + (out.max() + 1 - logits.min()))
    return out


def rerank_metrics(
    model: DualEncoder,
    tokenizer: TextTokenizer,
    store: ImageStore,
    texts: Sequence[str],
    relevant: torch.Tensor,
    scores: torch.Tensor,
    top: int,
    batch_size: int,
    metrics: dict[str, float],
    chance: dict[str, float],
) -> None:
    """Text→image recall@k after re-ranking each query's top `top` of the (T, N) first-stage `scores` with
    the matching head, as retrieval/reranked/text_to_image/R@k (chance: the first stage's). Only the images
    on some shortlist are encoded again for their tokens."""
    needed = shortlist(scores, top).unique()  # sorted
    if not len(needed):
        return
    tokens = torch.cat(
        [
            token_similarity.image_token_batch(model, store.get(needed[s : s + batch_size].tolist()))
            for s in range(0, len(needed), batch_size)
        ]
    )
    row = torch.full((scores.shape[1],), -1, dtype=torch.long)
    row[needed] = torch.arange(len(needed))
    words, mask = token_similarity.text_tokens(model, tokenizer, texts, batch_size)
    ranked = rerank_text_to_image(model, lambda idx: tokens[row[idx]], words, mask, scores, top)
    for k, v in recall_at_k(ranked, relevant).items():
        metrics[f"retrieval/reranked/text_to_image/{k}"] = v
        chance[f"retrieval/reranked/text_to_image/{k}"] = chance.get(f"retrieval/text_to_image/{k}", 0.0)
