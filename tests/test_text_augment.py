"""data.text_augment: seeded word drop / swap / mask of training captions — deterministic from (seed,
epoch, key, position), the same for tables and shards and after a resume, with the set rates."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lipkit.config import DataConfig
from lipkit.data.sources.registry import open_train_data, read_table
from lipkit.data.text_augment import MASK, augment_caption, check_text_augment
from lipkit.errors import UserError

CAPTION = "a small red apple on a wooden table next to a glass of water"


def test_off_is_the_caption_itself_and_each_edit_keeps_what_it_promises():
    assert augment_caption(CAPTION, {}, 0, 0, "k", 0) == CAPTION
    assert augment_caption(CAPTION, {"drop": 0.0, "swap": 0}, 0, 0, "k", 0) == CAPTION
    words = CAPTION.split()
    for key in range(50):
        swapped = augment_caption(CAPTION, {"swap": 0.2}, 0, 0, str(key), 0).split()
        assert Counter(swapped) == Counter(words)  # a swap only reorders
        dropped = augment_caption(CAPTION, {"drop": 0.9}, 0, 0, str(key), 0).split()
        assert len(dropped) >= 1 and all(w in words for w in dropped)
        masked = augment_caption(CAPTION, {"mask": 1.0}, 0, 0, str(key), 0).split()
        assert len(masked) == len(words) and masked.count(MASK) == len(words) - 1  # one word stays
    assert augment_caption("apple", {"drop": 1.0, "mask": 1.0}, 0, 0, "k", 0) == "apple"


def test_the_edit_depends_on_seed_epoch_key_and_position_alone():
    p = {"drop": 0.3, "swap": 0.2, "mask": 0.2}
    base = augment_caption(CAPTION, p, 1, 2, "key", 0)
    assert base == augment_caption(CAPTION, p, 1, 2, "key", 0)
    others = [(2, 2, "key", 0), (1, 3, "key", 0), (1, 2, "other", 0), (1, 2, "key", 1)]
    assert all(augment_caption(CAPTION, p, *o) != base for o in others)


@pytest.mark.parametrize("op", ["drop", "mask"])
def test_observed_rates_are_the_set_ones(op):
    words = CAPTION.split()
    edited = total = 0
    for key in range(2000):
        out = augment_caption(CAPTION, {op: 0.15}, 0, 0, str(key), 0).split()
        total += len(words)
        edited += len(words) - len(out) if op == "drop" else out.count(MASK)
    assert abs(edited / total - 0.15) < 0.01


def test_bad_settings_are_refused_with_the_fix():
    for bad, match in [({"shuffle": 0.1}, "no operation 'shuffle'"), ({"drop": 1.5}, "between 0 and 1")]:
        with pytest.raises(UserError, match=match):
            check_text_augment(bad)
    with pytest.raises(UserError, match="data.text_augment"):
        check_text_augment({"mask": True})


@pytest.fixture(scope="module")
def table_and_shards(table, tmp_path_factory):
    root = tmp_path_factory.mktemp("text-augment")
    path = root / "rows.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in read_table(table)[:64]:
            f.write(json.dumps({"image": str(r.image), "captions": r.captions, "key": r.key}) + "\n")
    from lipkit.data.convert import convert

    convert(path, root / "shards", 20, "image", "captions", "", False)
    return path, root / "shards"


def _captions(source, text_augment, start_batch=0) -> dict[tuple[int, str], list[str]]:
    d = DataConfig(train=str(source), text_augment=text_augment, caption_policy="first")
    d.cache_images, d.samples_per_epoch = False, 0
    b = open_train_data(d).batches(32, 16, 7)
    out = {}
    for e in (0, 1):
        for _, captions, keys in b.epoch(e, start_batch):
            out.update({(e, k): c for k, c in zip(keys, captions, strict=True)})
    return out


def test_tables_and_shards_edit_alike_and_a_resume_edits_the_same(table_and_shards):
    path, shards = table_and_shards
    p = {"drop": 0.2, "swap": 0.2, "mask": 0.1}
    plain, edited = _captions(path, {}), _captions(path, p)
    assert edited == _captions(path, p)  # a new instance (a resume) edits the same
    resumed = _captions(path, p, start_batch=2)
    assert resumed and all(edited[k] == v for k, v in resumed.items())
    assert sum(edited[k] != plain[k] for k in plain) > len(plain) // 2
    shard_caps = _captions(shards, p)
    common = set(edited) & set(shard_caps)
    assert len(common) > 20 and all(edited[k] == shard_caps[k] for k in common)
    with pytest.raises(UserError, match="data.text_augment"):
        _captions(path, {"dorp": 0.1})
