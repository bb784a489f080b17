"""Tables under torchrun: each rank reads, decodes and yields only its share of every global batch, the
ranks' shares concatenated are the batch one process reads (skipped images included), and every rank
resumes exactly — from its own state or from the ranks' merged one, under another rank count too."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import lipkit.data.image_store as image_store
from lipkit.data.sources.registry import read_table
from lipkit.data.table_batches import TrainBatches
from lipkit.errors import UserError
from test_data_sources import write_jsonl, write_rows

SIZE, BATCH = 8, 8


@pytest.fixture
def records(tmp_path):
    rows = write_rows(tmp_path, 36)
    for i in (3, 11, 20, 29):  # unusable rows, found only while streaming (cache off)
        rows[i]["image"] = f"img/missing{i}.png"
    return read_table(write_jsonl(tmp_path / "t.jsonl", rows))


def batches(records, rank: int = 0, world: int = 1, cache: bool = False) -> TrainBatches:
    return TrainBatches(
        records,
        SIZE,
        BATCH,
        seed=3,
        captions_per_image=2,
        cache=cache,
        max_skip_fraction=0.5,
        rank=rank,
        world=world,
    )


def run(b: TrainBatches, epochs=(0, 1), start: int = 0) -> list[tuple[torch.Tensor, list[str], list[str]]]:
    return [x for e in epochs for x in b.epoch(e, start if e == epochs[0] else 0)]


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_concatenated_are_the_one_process_batches(records, world, cache):
    one = run(batches(records, cache=cache))
    ranks = [run(batches(records, r, world, cache)) for r in range(world)]
    assert len(one) == 2 * (len(records) // BATCH) and all(len(r) == len(one) for r in ranks)
    for step, (images, captions, keys) in enumerate(one):
        parts = [r[step] for r in ranks]
        assert all(p[0].shape[0] == BATCH // world for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert [c for p in parts for c in p[1]] == captions
        assert [k for p in parts for k in p[2]] == keys
    if not cache:  # the missing rows were met and replaced: every batch is full of usable rows
        assert not any("missing" in k for _, _, keys in one for k in keys)
        assert sum(batches_skipped(records, world).values()) >= 1


def batches_skipped(records, world):
    """The skip counts of every rank's whole run, summed."""
    total = Counter()
    for r in range(world):
        total.update(batches_after(records, r, world).skipped)
    return total


def test_each_rank_decodes_its_share(records, monkeypatch):
    """Cache off: a rank decodes b = B / W images a step (plus the substitutes of its own bad rows)."""
    counts = []
    real = image_store.decode_record

    def counting(record, size, style="lipkit"):
        counts.append(record.key)
        return real(record, size, style)

    monkeypatch.setattr(image_store, "decode_record", counting)
    b = batches(records, 1, 2)
    steps = len(run(b, epochs=(0,)))
    assert steps * BATCH // 2 <= len(counts) <= steps * BATCH // 2 + 4  # 4 bad rows in the whole table


@pytest.mark.parametrize("start", [1, 3])
def test_every_rank_resumes_exactly_from_the_merged_state(records, start):
    world = 2
    whole = [run(batches(records, r, world)) for r in range(world)]
    states = []
    for r in range(world):  # each rank stops after `start` batches of epoch 0 and saves its state
        b = batches(records, r, world)
        gen = b.epoch(0)
        for _ in range(start):
            next(gen)
        states.append(b.state())
    merged = TrainBatches.merge_states(states)
    assert merged["batch"] == start and len(merged["ranks"]) == world
    assert merged["seen"] == sum(s["seen"] for s in states)
    for r in range(world):
        fresh = batches(records, r, world)
        fresh.load_state(merged)
        again = run(fresh, start=start)
        assert [k for _, _, k in again] == [k for _, _, k in whole[r][start:]]
        assert fresh.skipped == batches_after(records, r, world).skipped
    one = batches(records)  # one process resumes the two ranks' checkpoint: the same global batches
    one.load_state(merged)
    joined = [[k for part in parts for k in part[2]] for parts in zip(*whole, strict=True)]
    assert [k for _, _, k in run(one, start=start)] == joined[start:]


def batches_after(records, rank, world):
    b = batches(records, rank, world)
    run(b)
    return b


def test_a_table_without_usable_images_is_one_sentence(tmp_path):
    rows = write_rows(tmp_path, 10)
    for r in rows:
        r["image"] = "img/none.png"
    records = read_table(write_jsonl(tmp_path / "t.jsonl", rows))
    b = TrainBatches(records, SIZE, 4, seed=0, cache=False, max_skip_fraction=1.0, rank=1, world=2)
    with pytest.raises(
        UserError, match="No usable training image found in 64 tries|more than data.max_skip_fraction"
    ):
        next(b.epoch(0))
