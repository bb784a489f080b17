"""Text-side attack: word substitution in the caption queries of text→image retrieval, with candidates from the
model's own vocabulary — the whole-word tokens nearest to the word in the text tower's input word-embedding
table (no external word list or masked language model is reachable offline). In the spirit of BERT-Attack
(Li et al., 2020), the text step of Co-Attack and SGA.

For a caption c with relevant images R(c), F the split's clean normalised image embeddings, g the normalised
text embedding and t the logit scale, the loss to ascend is the retrieval loss of the caption as a query:

    L(c) = −log Σ_{i ∈ R(c)} softmax_i(t·g(c)·Fᵀ)

Words are ranked by importance, L(c without the word) − L(c); for the `words` most important (at most one
change per word), each of the `candidates` nearest whole-word tokens (cosine of the mean input embedding of
the word's tokens) is tried in the word's place and the one with the largest L is kept if it raises L.
Greedy, deterministic. Each distinct caption of the split is attacked once (captions shared by several
images stay shared), and no substitution may produce another caption of the split or one already produced
(it would then describe other images, or merge two queries into one).

Not implemented: the semantic-similarity and stop-word filters of BERT-Attack and SGA (a word may be
replaced by one that changes the caption's meaning — the gallery shows what was changed), and sub-word
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from rich.progress import track
from tokenizers import Tokenizer

from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.evaluate import evaluate_records


@dataclass
class WordSettings:
    words: int = 1  # words changed per caption at most
    candidates: int = 10  # nearest vocabulary words tried per word
    batch_size: int = 64


class Vocabulary:
    """The tokenizer's whole-word tokens (alphabetic, one token each) and the text tower's input embedding
    table, for nearest-neighbour candidates."""

    def __init__(self, model, tokenizer) -> None:
        self.tok = Tokenizer.from_str(tokenizer.tok.to_str())  # own copy, unpadded: one word's own ids
        self.tok.no_padding()
        self.tok.no_truncation()
        vocab = min(self.tok.get_vocab_size(), model.spec.vocab_size)  # added tokens beyond the table: none
        with torch.no_grad():
            ids = torch.arange(vocab, device=model.device).unsqueeze(0)
            self.table = model.text.word_embedding(ids)[0].float().cpu()
        words = [self.tok.decode([v], skip_special_tokens=True).strip() for v in range(vocab)]
        encoded = self.tok.encode_batch([w or "_" for w in words], add_special_tokens=False)
        keep = [
            v
            for v, (w, e) in enumerate(zip(words, encoded, strict=True))
            if len(w) > 1 and w.isalpha() and e.ids == [v]
        ]
        self.ids = torch.tensor(keep, dtype=torch.long)
        self.words = [words[v] for v in keep]
        self.unit = F.normalize(self.table[self.ids], dim=-1)

    def key(self, text: str) -> tuple[int, ...]:
        """What the model reads of a text (its token ids): two texts with one key are one caption to it."""
        return tuple(self.tok.encode(text, add_special_tokens=False).ids)

    def nearest(self, word: str, k: int) -> list[str]:
        """The k whole words nearest to `word` (not itself) by cosine of the mean input embedding."""
        ids = self.tok.encode(word, add_special_tokens=False).ids
        if not ids or not len(self.words):
            return []
        query = F.normalize(self.table[ids].mean(0), dim=-1)
        order = (self.unit @ query).argsort(descending=True).tolist()
        same = word.lower()
        return [self.words[j] for j in order[: k + 1] if self.words[j].lower() != same][:k]


def caption_losses(
    model, tokenizer, texts: list[str], relevant: torch.Tensor, images: torch.Tensor, batch: int
):
    """L(c) for each text (module docstring); `relevant` (len(texts), N) bool over the images (N, D)."""
    emb = embed_texts(model, tokenizer, texts, batch).float()
    logp = torch.log_softmax(model.scale().detach().float().cpu() * emb @ images.t(), dim=1)
    return -logp.masked_fill(~relevant, float("-inf")).logsumexp(1)


def substitute(
    model,
    tokenizer,
    vocab: Vocabulary,
    caption: str,
    own: torch.Tensor,
    images,
    s: WordSettings,
    taken=frozenset(),
):
    """The caption with up to `s.words` words replaced (module docstring); `own` (N,) its relevant images;
    a result whose token ids are in `taken` (the split's other captions, those already produced) is not tried."""
    words = caption.split()
    if not words:
        return caption
    dropped = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
    base, *without = caption_losses(
        model, tokenizer, [caption, *dropped], own.expand(len(words) + 1, -1), images, s.batch_size
    )
    order = sorted(range(len(words)), key=lambda i: -float(without[i] - base))
    changed = 0
    for i in order:
        if changed == s.words:
            break
        options, tried = [], []
        for w in vocab.nearest(words[i], s.candidates):
            text = " ".join(words[:i] + [w] + words[i + 1 :])
            if vocab.key(text) not in taken:
                options.append(w)
                tried.append(text)
        if not options:
            continue
        losses = caption_losses(model, tokenizer, tried, own.expand(len(tried), -1), images, s.batch_size)
        best = int(losses.argmax())
        if losses[best] > base:
            words[i], base, changed = options[best], losses[best], changed + 1
    return " ".join(words) if changed else caption


def attack_captions(
    model, tokenizer, texts: list[str], relevant: torch.Tensor, images: torch.Tensor, s: WordSettings
):
    """{caption: adversarial caption} for each distinct caption; `relevant` (T, N), `images` (N, D) normalised."""
    vocab = Vocabulary(model, tokenizer)
    taken, out = {vocab.key(t) for t in texts}, {}
    for j, t in enumerate(track(texts, description="word substitution")):
        out[t] = substitute(model, tokenizer, vocab, t, relevant[j], images, s, taken)
        taken.add(vocab.key(out[t]))
    return out


def words_attack(model, tokenizer, records, store, targets, cfg, sets, s: WordSettings) -> dict:
    """Attack the split's retrieval captions (`targets`: the retrieval task's) and score the split clean and
    with the adversarial captions by eval's function (the images unchanged). The success rate is per
    distinct caption: top-1 image one of its own clean, not under attack."""
    images = embed_images(model, store, cfg.batch_size)
    relevant = targets.truth.t()  # (T, N)
    mapping = attack_captions(model, tokenizer, targets.names, relevant, images, s)
    which = cfg.retrieval_caption
    attacked = [
        replace(
            r,
            captions=[
                mapping.get(c, c) if k == min(which, len(r.captions) - 1) else c
                for k, c in enumerate(r.captions)
            ],
        )
        for r in records
    ]

    def right(texts: list[str]) -> torch.Tensor:
        best = (embed_texts(model, tokenizer, texts, cfg.batch_size).float() @ images.t()).argmax(1)
        return relevant[torch.arange(len(texts)), best]

    clean_right, adv_right = right(targets.names), right([mapping[t] for t in targets.names])
    metrics = {
        name: evaluate_records(model, tokenizer, recs, cfg, store=store, details=False, labels=sets)[
            "metrics"
        ]
        for name, recs in (("clean", records), ("attacked", attacked))
    }
    pairs = [
        {
            "caption": t,
            "adversarial": mapping[t],
            "right": bool(clean_right[j]),
            "right_attacked": bool(adv_right[j]),
        }
        for j, t in enumerate(targets.names)
        if mapping[t] != t
    ]
    hit = clean_right.sum()
    success = float((clean_right & ~adv_right).sum()) / int(hit) if hit else None
    return {"metrics": metrics, "success": success, "pairs": pairs, "captions": len(targets.names)}
