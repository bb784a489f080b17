"""data.split_sentences (DreamLIP's sub-captions): the sentences of a sample's captions are the pool its
training captions are drawn from — the same for tables and shards, and after a resume."""

from __future__ import annotations

import json

import pytest

from lipkit.config import DataConfig
from lipkit.data.batching import choose_captions
from lipkit.data.sentences import sentence_pool, sentences
from lipkit.data.sources.registry import open_train_data, read_table

LONG = "A red apple on a table. It is shiny!  Is it ripe? Maybe; nobody knows"


def test_sentences_are_cut_after_their_ends():
    assert sentences(LONG) == [
        "A red apple on a table.",
        "It is shiny!",
        "Is it ripe?",
        "Maybe;",
        "nobody knows",
    ]
    assert sentences("no end here") == ["no end here"]
    assert sentences("3.5 kg of apples. Fresh.") == ["3.5 kg of apples.", "Fresh."]  # no space: no cut
    assert sentences("赤いリンゴ。光っている！") == ["赤いリンゴ。", "光っている！"]
    assert sentences("   ") == []
    assert sentences("すごい！！次") == ["すごい！！", "次"]  # a run of ends is one end
    assert sentences("「こんにちは。」と言った。") == ["「こんにちは。」", "と言った。"]  # closing quote kept
    assert sentences('end."  Then') == ['end."', "Then"]
    assert sentences("Wait . . . what") == ["Wait . . .", "what"]  # letterless pieces join the one before
    assert sentences("1. A dog 2. A cat") == ["1. A dog 2.", "A cat"]  # a marker inside a sentence stays
    assert sentences("It ends 2.") == ["It ends 2."]
    assert sentences("A dog. 3.") == ["A dog. 3."]  # a trailing number stays with the sentence before it


def test_the_pool_is_every_distinct_sentence_in_order():
    pool = sentence_pool(["A cat. A hat.", "A hat. A bat."])
    assert pool == ["A cat.", "A hat.", "A bat."]
    assert sentence_pool(["", " "]) == ["", " "]  # nothing to split: the captions as they are
    chosen = choose_captions([LONG], "key", 0, 0, "random", 3, split_sentences=True)
    assert len(set(chosen)) == 3 and set(chosen) <= set(sentences(LONG))
    assert choose_captions([LONG], "key", 0, 0, "first", 2, split_sentences=True) == sentences(LONG)[:2]
    assert choose_captions([LONG], "key", 0, 0, "first", 1) == [LONG]  # off: the caption itself


@pytest.fixture(scope="module")
def long_table(table, tmp_path_factory):
    root = tmp_path_factory.mktemp("sentences")
    path = root / "long.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in read_table(table)[:64]:
            long = " ".join(f"{c.rstrip('.')}." for c in r.captions[:3]) + f" Row {r.key} ends here."
            f.write(json.dumps({"image": str(r.image), "captions": [long], "key": r.key}) + "\n")
    from lipkit.data.convert import convert

    convert(path, root / "shards", 20, "image", "captions", "", False)
    return path, root / "shards"


def _captions(source, start_batch=0) -> dict[tuple[int, str], list[str]]:
    d = DataConfig(train=str(source), split_sentences=True, captions_per_image=2)
    d.cache_images, d.samples_per_epoch = False, 0
    b = open_train_data(d).batches(32, 16, 3)
    out = {}
    for e in (0, 1):
        for _, captions, keys in b.epoch(e, start_batch):
            out.update({(e, k): captions[2 * i : 2 * i + 2] for i, k in enumerate(keys)})
    return out


def test_tables_and_shards_draw_the_same_sentences_and_resume_does_too(long_table):
    path, shards = long_table
    caps = _captions(path)
    rows = {r.key: r.captions[0] for r in read_table(path)}
    for (_, key), pair in caps.items():
        assert len(pair) == 2 and all(s in sentences(rows[key]) for s in pair)
    assert any(pair[0] != pair[1] for pair in caps.values())
    resumed = _captions(path, start_batch=2)
    assert resumed and all(caps[k] == v for k, v in resumed.items())
    shard_caps = _captions(shards)
    common = set(caps) & set(shard_caps)
    assert len(common) > 20 and all(caps[k] == shard_caps[k] for k in common)
