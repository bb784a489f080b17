"""data.caption_mix: caption sources kept apart in columns, sampled per (seed, epoch, key) with set
probabilities — observed frequencies, renormalisation when a row lacks a source, determinism across
instances (a resume), and the same draw from a table and from shards of the same rows."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lipkit.config import DataConfig
from lipkit.data.caption_mix import check_mix, mixed_captions, pick_source
from lipkit.data.sources.registry import open_train_data, read_table
from lipkit.errors import UserError

MIX = {"captions": 0.7, "captions_retrieved": 0.2, "captions_generated": 0.1}


def test_observed_frequencies_are_the_set_ones():
    available = {"captions": ["a"], "captions_retrieved": ["b"], "captions_generated": ["c"]}
    n = 20_000
    for epoch in (0, 3):
        seen = Counter(pick_source(available, MIX, f"row-{i}", seed=1, epoch=epoch) for i in range(n))
        for name, w in MIX.items():
            assert abs(seen[name] / n - w) < 0.02, (name, seen)
    # a row without a source: the others renormalised (0.7 / 0.8 and 0.1 / 0.8)
    two = {"captions": ["a"], "captions_generated": ["c"]}
    seen = Counter(pick_source(two, MIX, f"row-{i}", seed=1, epoch=0) for i in range(n))
    assert abs(seen["captions"] / n - 0.875) < 0.02 and set(seen) == set(two)


def test_the_draw_depends_on_seed_epoch_and_key_alone():
    meta = {"captions_retrieved": json.dumps(["r1", "r2"]), "captions_generated": []}
    draws = [mixed_captions(["own"], meta, "k", 0, e, "captions", MIX) for e in range(200)]
    again = [mixed_captions(["own"], dict(meta), "k", 0, e, "captions", MIX) for e in range(200)]
    assert draws == again and {tuple(d) for d in draws} == {("own",), ("r1", "r2")}
    assert mixed_captions(["own"], {}, "k", 0, 0, "captions", {"captions_retrieved": 1.0}) == ["own"]
    for bad in ({"captions": -1.0}, {"captions": 0.0}):
        with pytest.raises(UserError, match="data.caption_mix"):
            check_mix(bad)


@pytest.fixture(scope="module")
def mixed_table(table, tmp_path_factory):
    """The fixture's rows with a second caption source, as a JSONL table and as shards."""
    root = tmp_path_factory.mktemp("caption-mix")
    path = root / "mixed.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in read_table(table)[:64]:
            row = {"image": str(r.image), "captions": r.captions, "key": r.key}
            row["captions_retrieved"] = [f"retrieved {r.key}"]
            f.write(json.dumps(row) + "\n")
    from lipkit.data.convert import convert

    convert(path, root / "shards", 20, "image", "captions", "", False)
    return path, root / "shards"


def _epoch_captions(source, epochs=(0, 1)) -> dict[tuple[int, str], list[str]]:
    d = DataConfig(train=str(source), caption_mix={"captions": 0.5, "captions_retrieved": 0.5})
    d.cache_images, d.samples_per_epoch = False, 0
    b = open_train_data(d).batches(32, 16, 7)
    out = {}
    for e in epochs:
        for _, captions, keys in b.epoch(e, 0):
            out.update({(e, k): c for k, c in zip(keys, captions, strict=True)})
    return out


def test_tables_and_shards_draw_the_same_source_and_resume_does_too(mixed_table):
    path, shards = mixed_table
    table_caps = _epoch_captions(path)
    assert table_caps == _epoch_captions(path)  # a new instance (a resume) draws the same
    retrieved = sum(c.startswith("retrieved ") for c in table_caps.values())
    assert 0.3 < retrieved / len(table_caps) < 0.7
    shard_caps = _epoch_captions(shards)
    common = set(table_caps) & set(shard_caps)
    assert len(common) > 20
    for e, k in common:  # the same source for the same (epoch, key), whatever the kind of source
        assert table_caps[e, k].startswith("retrieved ") == shard_caps[e, k].startswith("retrieved ")


def test_a_mix_column_no_row_has_is_refused(mixed_table):
    path, _ = mixed_table
    d = DataConfig(train=str(path), caption_mix={"captions": 0.5, "captions_retreived": 0.5})
    d.cache_images, d.samples_per_epoch = False, 0
    with pytest.raises(UserError, match="column\\(s\\) 'captions_retreived'; .* captions_retrieved"):
        open_train_data(d)


def test_a_mix_source_named_like_a_caption_field_competes_in_shards_too(table, tmp_path):
    """`text` is one of the fields a shard's JSON may hold its captions in; next to `captions` it stays
    metadata, so a mix naming it draws it from shards as from the table."""
    from lipkit.data.convert import convert

    path = tmp_path / "t.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in read_table(table)[:32]:
            f.write(
                json.dumps({"image": str(r.image), "captions": r.captions, "key": r.key, "text": "other"})
                + "\n"
            )
    convert(path, tmp_path / "shards", 16, "image", "captions", "", False)
    for source in (path, tmp_path / "shards"):
        d = DataConfig(train=str(source), caption_mix={"captions": 0.5, "text": 0.5})
        d.cache_images, d.samples_per_epoch = False, 0
        drawn = [c for _, caps, _ in open_train_data(d).batches(16, 16, 7).epoch(0, 0) for c in caps]
        assert 0.2 < drawn.count("other") / len(drawn) < 0.8, source
