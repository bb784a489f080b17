"""Caption metrics (eval/caption_metrics.py) against the COCO caption evaluation's own scorers
(pycocoevalcap 1.2's BleuScorer with option "closest" and CiderScorer, run on these captions after
lipkit's tokenizer: the numbers below are theirs), and smoothed BLEU against its definition."""

import math

import pytest

from lipkit.eval.caption_metrics import bleu, cider_d, tokenize

CANDIDATES = [
    "a red heart on white",
    "grinning face with big eyes",
    "flag: Maldives",
    "a dog",
    "the cat sat on the mat",
]
REFERENCES = [
    ["red heart", "a red heart", "a heart that is red on white"],
    ["grinning face with big eyes", "smiling face"],
    ["flag of the Maldives", "Maldives flag"],
    ["dog face", "a dog's face", "puppy"],
    ["the cat is on the mat", "there is a cat on the mat"],
]
COCO_BLEU = [0.9499999999525, 0.7958224257077985, 0.6816071175608178, 0.5484456251125067]  # BLEU-1..4
COCO_CIDER = 3.012767161843396
COCO_CIDER_EACH = [
    3.389965266213888,
    5.149426225739538,
    2.167188483966218,
    0.7563660197447641,
    3.600889813552573,
]


def test_tokens_drop_punctuation_and_case():
    assert tokenize("Flag: Maldives!") == ["flag", "maldives"]
    assert tokenize("a dog's  face, ok") == ["a", "dog's", "face", "ok"]


def test_bleu_and_cider_d_match_the_coco_caption_scorers():
    for n, want in enumerate(COCO_BLEU, start=1):
        assert math.isclose(bleu(CANDIDATES, REFERENCES, max_n=n), want, rel_tol=1e-8)
    score, each = cider_d(CANDIDATES, REFERENCES)
    assert math.isclose(score, COCO_CIDER, rel_tol=1e-12)
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(each, COCO_CIDER_EACH, strict=True))


def test_smoothing_adds_one_to_the_higher_orders():
    assert bleu(["red heart"], [["red heart"]]) == 0.0  # no 3- or 4-grams: unsmoothed BLEU-4 is 0
    assert bleu(["red heart"], [["red heart"]], smooth=True) == 1.0
    # by hand: p1 = 2/3, p2 = (0 + 1)/(2 + 1) (no shared bigram), p3 = (0 + 1)/(1 + 1), p4 = (0 + 1)/(0 + 1)
    want = math.exp((math.log(2 / 3) + math.log(1 / 3) + math.log(1 / 2) + math.log(1)) / 4)
    assert math.isclose(bleu(["red big heart"], [["red heart now"]], smooth=True), want, rel_tol=1e-12)
    # brevity: C = 2 < R = 4 (the closest reference), every precision 1: BLEU-4 = exp(1 − 4/2)
    far = ["a red heart here", "one two three four five six"]
    assert math.isclose(bleu(["red heart"], [far], smooth=True), math.exp(-1), rel_tol=1e-12)
    # a tie between lengths 1 and 3 takes the shorter: R = 1 < C, no brevity penalty
    assert bleu(["red heart"], [["red", "red heart x"]], smooth=True) == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one list each"):
        bleu(["a"], [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a"], [[]])
