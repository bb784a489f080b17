"""Masked language modelling through the fusion head (UNITER's MLM, Chen et al., 2020, "UNITER: UNiversal
Image-TExt Representation Learning", §3.1; LightCLIP's, Nie et al., 2023, "LightCLIP: Learning Multi-Level
Interaction for Lightweight Vision-Language Models", through a light fusion module).

For each true pair (image i, its caption y) of the global batch:

    ỹ = mask(y, 15 %)     (whole words; each chosen token → [MASK] 80 %, a random token 10 %, itself 10 %)
    g_1 … g_L = the text tower's normalised token features of ỹ
    h = Fuse([CLS; g_1 … g_L; u_1 … u_N])      the matching head's fusion layers (models.matching_head), u
                                                 image i's normalised token features (not masked)
    L_mlm = 1/M Σ_{masked k} −log softmax(O(h_k))_{y_k}      O: dense, GELU, LayerNorm, linear to the vocabulary

so the words hidden from the caption must be recovered from the rest of it and from the image, through the
same fusion that scores matching (objectives.itm's `mlm_weight`). The output layer O is the objective's
own (trained with the run, not part of the checkpoint).

Which encoder: the fusion head is bidirectional whatever the text tower; the masks need a tokenizer with a
[MASK] token, i.e. a pretrained BERT-style text tower (the demo's MiniLM, itself bidirectional). lipkit's own
BPE tokenizer has none and is refused.
What differs from UNITER: its MLM runs through the whole 12/24-layer BERT over word embeddings and region
features, with masks drawn per token and one task sampled per batch; lipkit masks whole words of the text
tower's input, fuses its outputs in 1–2 layers, and adds the term to every step. Of LightCLIP only this MLM
term is implemented (not its multi-level interaction or its token–patch bipartite matching). Every rank
encodes and fuses the masked captions of the whole global batch (the ids are gathered), as the matching
term scores all its pairs: exact against one process, redundant work on many; no local form yet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError
from lipkit.models.matching_head import trim_text
from lipkit.objectives.word_masking import WordMasker, masked_word_loss


class FusionMLM(nn.Module):
    """L_mlm of one global batch (see the module docstring); bound to the run's tokenizer and model first."""

    def __init__(self, rate: float = 0.15) -> None:
        super().__init__()
        if not 0 < rate < 1:
            raise ValueError(f"mlm_mask must be a fraction in (0, 1), got {rate!r}")
        self.rate = rate
        self.masker = WordMasker()
        self.output: nn.Sequential | None = None

    def bind_tokenizer(self, tokenizer: Any) -> None:
        self.masker.bind_tokenizer(
            tokenizer, "UNITER's masked language modelling (mlm_weight > 0)", "mlm_weight=0"
        )

    def bind_model(self, model: nn.Module) -> None:
        """The output layer O at the matching head's width, over the tokenizer's vocabulary."""
        if self.masker.mask_id is None:
            raise ValueError("bind_tokenizer before bind_model: the term masks with the tokenizer's [MASK]")
        width = model.matcher.cls_embedding.shape[-1]
        if model.spec.vocab_size != self.masker.vocab:
            raise UserError(
                f"The model reads {model.spec.vocab_size} token ids and its tokenizer has {self.masker.vocab}; "
                "train with the tokenizer of its text tower."
            )
        self.output = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, self.masker.vocab)
        ).to(model.matcher.cls_embedding.device)

    def forward(
        self, model: nn.Module, head: nn.Module, image_tokens: torch.Tensor, ids: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """model: the DualEncoder (its text tower encodes the masked captions); head: its matching head;
        image_tokens (B, N, D) normalised; ids (B, L) the first captions; step: seeds the masks.
        Returns (L_mlm, the accuracy of the masked-word predictions)."""
        return self.score(head, image_tokens, self.encode(model, ids, step))

    def encode(self, model: nn.Module, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        """The masked captions through the text tower: (normalised token features, real-token mask,
        labels (−1 where not masked)), trimmed to the longest caption — what `score` fuses (once per
        batch, however many fusions read it)."""
        ids, real = trim_text(ids, ids != model.spec.pad_id)  # the all-padding columns dropped: exact
        ((masked, labels),) = self.masker(ids, (self.rate,), step)
        _, tokens = model.text(masked, return_tokens=True)
        return F.normalize(tokens, dim=-1), real, labels

    def score(
        self, head: nn.Module, image_tokens: torch.Tensor | None, encoded: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_mlm, accuracy) of the `encode`d masked captions fused by `head` with `image_tokens`."""
        assert self.output is not None, "the trainer binds the objective to its model first"
        tokens, real, labels = encoded
        n = tokens.shape[1]
        states = head.fuse(image_tokens, tokens, real)[:, 1 : 1 + n]
        chosen = labels >= 0
        logits = self.output(states[chosen].to(self.output[0].weight.dtype))
        target = labels[chosen]
        accuracy = (logits.argmax(1) == target).float().mean() if len(target) else logits.new_zeros(())
        return masked_word_loss(logits, target), accuracy
