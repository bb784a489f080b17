"""Caption metrics from their reference definitions, in Python (no Java tokenizer): corpus BLEU-4 and
CIDEr-D of generated captions against each image's reference captions.

Tokens: NFKC, lower-cased, runs of letters and digits (an apostrophe inside a word kept): punctuation
is dropped, as the COCO caption evaluation drops it after its PTB tokenizer.

BLEU-4 (Papineni et al., 2002), over the corpus: with the clipped n-gram matches m_n = Σ_c Σ_g
min(count_c(g), max_r count_r(g)) and the candidate n-grams l_n = Σ_c Σ_g count_c(g),

    p_n = m_n / l_n,   BP = min(1, exp(1 − R / C)),   BLEU-4 = BP · exp(¼ Σ_{n=1..4} log p_n)

with C the candidates' total length and R the sum of each candidate's closest reference length (the
shorter on a tie). `smooth=True` adds one to m_n and l_n for n ≥ 2 (Lin & Och, 2004; NLTK's method 2):
labels of one or two words have no 4-grams, so unsmoothed BLEU-4 of short captions is often 0.

CIDEr-D (Vedantam et al., 2015, as the COCO caption evaluation computes it): for n = 1..4 each caption
is a vector of n-gram counts weighted by idf(g) = log(I) − log(max(1, df(g))), with I the number of images
and df(g) the number of images whose references contain g. A candidate c against a reference r:

    s_n(c, r) = Σ_g min(c_g, r_g) · r_g / (‖c‖ ‖r‖) · exp(−(|c| − |r|)² / (2σ²)),   σ = 6
    CIDEr-D(c) = 10 · ¼ Σ_n mean_r s_n(c, r)

(clipped counts and the length penalty are what make it CIDEr-D); the corpus score is the mean over
images. idf comes from the references of the evaluated images, so scores depend on the set scored
together, as in the reference implementation.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
SIGMA = 6.0


def tokenize(text: str) -> list[str]:
    """A caption's words: NFKC, lower-cased, punctuation dropped."""
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(
            f"{len(candidates)} candidates but {len(references)} reference lists; give one list each"
        )
    if not candidates:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference caption")


def bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, smooth: bool = False
) -> float:
    """Corpus BLEU-`max_n` of `candidates` (one per image) against each image's `references`."""
    _check(candidates, references)
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        words, ref_words = tokenize(cand), [tokenize(r) for r in refs]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(words, n)
            best: Counter[tuple[str, ...]] = Counter()
            for r in ref_words:
                best |= ngrams(r, n)  # the most times any one reference has each n-gram
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if smooth:
        matches = [m + (n > 0) for n, m in enumerate(matches)]
        totals = [t + (n > 0) for n, t in enumerate(totals)]
    if cand_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = min(0.0, 1.0 - ref_len / cand_len)
    return math.exp(brevity + log_p)


def _tfidf(counts: Counter[tuple[str, ...]], df: Counter[tuple[str, ...]], log_images: float):
    vec = {g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in counts.items()}
    return vec, math.sqrt(sum(v * v for v in vec.values()))


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, each candidate's CIDEr-D) of `candidates` against each image's `references`."""
    _check(candidates, references)
    refs = [[tokenize(r) for r in per] for per in references]
    df: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(max_n)]
    for per in refs:
        for n in range(1, max_n + 1):
            df[n - 1].update({g for r in per for g in ngrams(r, n)})
    log_images = math.log(len(candidates))
    scores = []
    for cand, per in zip(candidates, refs, strict=True):
        words = tokenize(cand)
        total = 0.0
        for n in range(1, max_n + 1):
            c_vec, c_norm = _tfidf(ngrams(words, n), df[n - 1], log_images)
            per_ref = 0.0
            for r in per:
                r_vec, r_norm = _tfidf(ngrams(r, n), df[n - 1], log_images)
                dot = sum(min(v, r_vec[g]) * r_vec[g] for g, v in c_vec.items() if g in r_vec)
                if c_norm and r_norm:
                    per_ref += (
                        dot / (c_norm * r_norm) * math.exp(-((len(words) - len(r)) ** 2) / (2 * SIGMA**2))
                    )
            total += per_ref / len(per)
        scores.append(10.0 * total / max_n)
    return sum(scores) / len(scores), scores
