"""CoOp's learnable prompt context (Zhou et al., 2022, "Learning to Prompt for Vision-Language Models").

A class's prompt is the tokenised "{class}." with M learned word vectors put right after the start token:

    t_c = [SOS] [V]_1 … [V]_M [CLASS_c] . [EOS]      w_c = g(t_c) / ‖g(t_c)‖

where g is the text tower run on word embeddings instead of token ids and w_c is the class's classifier
row (an image x is scored x̂·w_cᵀ). The context is class-shared (one (M, width) matrix, usable with any
class name, so it classifies classes it never saw) or class-specific (CoOp's "CSC": one matrix per trained
class; a class without one keeps the zero-shot templates). Initialised from the word embeddings of a phrase
("a photo of a": the prompt then equals that template exactly) or drawn from N(0, 0.02²) as in CoOp.

The prompted path never reads a text tower's feature cache (a locked Hugging Face tower caches pooled
features by token ids, which a learned context would make stale): it always runs the encoder.

Not implemented: CoOp's "end" and "middle" class-token positions (the class name always follows the
context, CoOp's default "end"); its SGD schedule (lipkit adapt uses full-batch AdamW); prompt ensembling.
"""

from __future__ import annotations

import torch
from torch import nn

from lipkit.errors import UserError


class PromptContext(nn.Module):
    def __init__(self, width: int, length: int, classes: list[str] | None = None) -> None:
        super().__init__()
        if length < 1:
            raise UserError(f"A CoOp prompt context needs 1 or more vectors, not {length}.")
        self.classes = list(classes or [])  # class-specific contexts, in this order; empty: class-shared
        self.context = nn.Parameter(torch.empty(len(self.classes) or 1, length, width))
        nn.init.normal_(self.context, std=0.02)

    @property
    def class_specific(self) -> bool:
        return bool(self.classes)

    def rows(self, classes: list[str]) -> list[int | None]:
        """Each class's context row (class-shared: 0 for all; class-specific: its row, or None)."""
        if not self.class_specific:
            return [0] * len(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        return [index.get(str(c)) for c in classes]

    def features(self, tower: nn.Module, ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """(B, D) unnormalised text features of the prompts `ids` (tokenised "{class}.", start token
        first) with context row `rows[b]` inserted after the start token."""
        return prompted_features(tower, ids, self.context[torch.tensor(rows, device=ids.device)])


def prompted_features(tower: nn.Module, ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, D) unnormalised text features of the prompts `ids` (start token first) with the (B, M, width)
    `context` inserted after the start token; any tensor (GRAM steps along a context that is no Parameter)."""
    words = tower.word_embedding(ids)
    ctx = context.to(words.dtype)
    m = ctx.shape[1]
    x = torch.cat([words[:, :1], ctx, words[:, 1:]], dim=1)
    # the context's places hold the start id in the id view: neither padding nor an end token
    shown = torch.cat([ids[:, :1], ids[:, :1].expand(-1, m), ids[:, 1:]], dim=1)
    real = (shown != tower.pad_id).any(0).nonzero()  # up to the last real column (a pad id may be a token)
    used = int(real.max()) + 1 if real.numel() else shown.shape[1]
    if used > tower.max_positions:
        raise UserError(
            f"A class prompt with {m} context vectors is {used} tokens long, more than the text tower's "
            f"{tower.max_positions} positions; use a shorter context (--context) or shorter class names."
        )
    return tower.forward_embeds(x[:, :used], shown[:, :used])
