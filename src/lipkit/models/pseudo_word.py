"""An image as a word of a sentence: Pic2Word's mapping network (Saito et al., 2023, "Pic2Word: Mapping
Pictures to Words for Zero-shot Composed Image Retrieval") and the composed query it builds.

A mapping network φ — Pic2Word's three-layer MLP, (Linear → Dropout → ReLU) twice then Linear, hidden
width 512, dropout 0.1 — turns an image's normalised embedding v̂ into a word vector s = φ(v̂) that takes
the place of the placeholder "*" in a prompt:

    q = g("a photo of [s] that {modification}")

where g is the text tower run on word embeddings (the tokenised prompt's word vectors, the "*" row replaced
by s). The composed query is q̂ = q/‖q‖, scored against the gallery's image embeddings. g is never read
through a token-id feature cache: the ids do not say what s is.

Training φ (Pic2Word, on unlabelled images) and tuning g for composed queries (RTD) are in adapt.composed.

Not implemented here: Pic2Word's domain prompts ("a {domain} of *") and its per-dataset prompt wording
(e.g. "a * shirt that {}" for FashionIQ); the prompt is one setting of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lipkit.errors import UserError

PLACEHOLDER = "*"
PROMPT = "a photo of * that {}"  # at query time (RTD's wording for CIRR)
TRAIN_PROMPT = "a photo of *"  # Pic2Word's training prompt


class PseudoWord(nn.Module):
    """φ: (B, D) normalised image embeddings → (B, word width) word vectors."""

    def __init__(self, embed_dim: int, word_width: int, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
            nn.ReLU(),
            nn.Linear(hidden, word_width),
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v)


def check_prompt(prompt: str, composed: bool = True) -> None:
    """A prompt holds one placeholder "*" (before "{}", the modification, when `composed`)."""
    if prompt.count(PLACEHOLDER) != 1 or (composed and "{}" not in prompt.split(PLACEHOLDER, 1)[1]):
        raise UserError(
            f"The composed-query prompt '{prompt}' must hold one '{PLACEHOLDER}' (the image's word) followed "
            "by '{}' (the modification), e.g. 'a photo of * that {}'."
        )


def prompt_ids(tokenizer, prompt: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids of the prompts, the modification put in "{}" (or none), and each row's placeholder
    position: the prompt's words before and after "*" are tokenised apart (so the placeholder is one slot
    whatever the tokenizer makes of "*"; the words after it as if a space preceded them), the slot holding
    the start id (neither padding nor an end token; its word vector is replaced). Truncated to the
    context, the end token kept."""
    head, tail = prompt.split(PLACEHOLDER, 1)
    head = head.rstrip()  # a byte-level BPE would make the space before "*" a token of its own
    tails = [tail.replace("{}", t) for t in texts] if "{}" in tail else [tail] * len(texts)
    encoded = tokenizer.tok.encode_batch([head, *tails], add_special_tokens=False)

    def real(e) -> list[int]:  # without the padding (whose id may be an ordinary token)
        return [i for i, m in zip(e.ids, e.attention_mask, strict=True) if m]

    n, pre = tokenizer.context_length, real(encoded[0])
    if len(pre) + 3 > n:
        raise UserError(
            f"The composed-query prompt '{prompt}' leaves no room for its placeholder in the text tower's "
            f"{n} tokens; use a shorter prompt."
        )
    rows = []
    for e in encoded[1:]:
        row = [tokenizer.sot_id, *pre, tokenizer.sot_id, *real(e)][: n - 1] + [tokenizer.eot_id]
        rows.append(row + [tokenizer.pad_id] * (n - len(row)))
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, torch.full((len(rows),), len(pre) + 1, dtype=torch.long)


def composed_features(
    tower: nn.Module, word: nn.Module, tokenizer, images: torch.Tensor, texts: Sequence[str], prompt: str
) -> torch.Tensor:
    """(B, D) unnormalised text features of `prompt` with `texts[b]` in "{}" and φ(images[b]) in "*"
    (`images`: (B, D) normalised embeddings; or word vectors already, when `word` is None)."""
    ids, at = prompt_ids(tokenizer, prompt, texts)
    ids, at = ids.to(images.device), at.to(images.device)
    real = (ids != tower.pad_id).any(0).nonzero()  # up to the last real column (a pad id may be a token)
    ids = ids[:, : int(real.max()) + 1] if real.numel() else ids
    x = tower.word_embedding(ids)
    s = (word(images) if word is not None else images).to(x.dtype)
    place = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    place[torch.arange(ids.shape[0], device=ids.device), at] = True
    x = torch.where(place.unsqueeze(-1), s.unsqueeze(1), x)
    return tower.forward_embeds(x, ids)
