"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on captions or loaded from a file.

Every caption becomes `<|startoftext|> tokens… <|endoftext|>`, truncated (keeping the end token)
and padded with id 0 to a fixed context length. Text is NFC-normalised and lower-cased; byte-level
BPE means any Unicode string (any language, emoji) encodes without unknown tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lipkit.errors import UserError

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
SPECIALS = [PAD, SOT, EOT]
# Names of the same roles in other tokenizers that lipkit loads (BERT-style pretrained text towers).
PAD_NAMES, SOT_NAMES, EOT_NAMES = (PAD, "[PAD]", "<pad>"), (SOT, "[CLS]", "<s>"), (EOT, "[SEP]", "</s>")


def _special(tokenizer: Tokenizer, names: Sequence[str]) -> tuple[int | None, str]:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id, name
    return None, names[0]


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer` and turns batches of strings into padded id tensors."""

    def __init__(self, tokenizer: Tokenizer, context_length: int) -> None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copy: padding/truncation are set on it
        self.tok = tokenizer
        self.context_length = context_length
        self.pad_id, pad_token = _special(tokenizer, PAD_NAMES)
        if self.pad_id is None and tokenizer.padding is not None:
            # No dedicated pad token (e.g. CLIP's BPE pads with id 0): use the padding saved with it.
            self.pad_id, pad_token = tokenizer.padding["pad_id"], tokenizer.padding["pad_token"]
        self.sot_id, _ = _special(tokenizer, SOT_NAMES)
        self.eot_id, _ = _special(tokenizer, EOT_NAMES)
        if None in (self.pad_id, self.sot_id, self.eot_id):
            raise UserError(
                f"The tokenizer lacks start/end/pad tokens (such as {SPECIALS}); train one with lipkit "
                "or use a CLIP/BERT-style tokenizer.json."
            )
        tokenizer.enable_truncation(max_length=context_length)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=context_length)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Strings (or one string) → int64 (B, context_length) ids: start/end tokens, truncated, padded."""
        encs = self.tok.encode_batch([texts] if isinstance(texts, str) else list(texts))
        return torch.tensor([e.ids for e in encs], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        while ids and ids[-1] == self.pad_id:  # a pad that is an ordinary token (CLIP's "!") is not skipped
            ids.pop()
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path, context_length: int) -> TextTokenizer:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise UserError(
                f"Tokenizer file '{p}' does not exist; point to a checkpoint dir or a tokenizer.json."
            )
        return cls(Tokenizer.from_file(str(p)), context_length)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> TextTokenizer:
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
        )
        return cls(tok, context_length)
