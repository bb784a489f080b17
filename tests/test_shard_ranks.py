"""WebDataset shards under several ranks: N ranks × L streams read exactly the sample stream of one
process with N·L streams (the concatenated local batches are its global batches), each rank decodes
only its share, a merged checkpoint of the ranks resumes exactly under either layout, and shard
layouts that cannot work end in one clear sentence (data/shard_batches.py)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

import lipkit.data.shard_streams as shard_streams
from lipkit.data.records import Record
from lipkit.data.shard_batches import ShardBatches
from lipkit.data.shard_writer import ShardOutput
from lipkit.errors import UserError

SIZE = 8


def write_shards(root: Path, n: int, shard_size: int, broken: tuple[int, ...] = ()) -> list[str]:
    """`n` samples of tiny PNGs with three captions each in shards of `shard_size`; the samples numbered
    in `broken` hold bytes no image decoder reads."""
    rng = random.Random(0)
    out = ShardOutput(root, shard_size)
    for i in range(n):
        buf = io.BytesIO()
        color = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (SIZE + i % 3, SIZE), color).save(buf, format="PNG")
        data = b"not an image at all" if i in broken else buf.getvalue()
        out.write(Record(root / "x", [f"cap {i} {j}" for j in range(3)], key=f"s{i:03d}"), data, "png")
    return [str(p) for p in out.close()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """5 shards (9, 9, 9, 9, 5 samples: not divisible by 2 or 4 streams) with 3 broken samples."""
    return write_shards(tmp_path_factory.mktemp("ranks"), 41, 9, broken=(4, 20, 37))


def make(
    urls: list[str], world: int = 1, rank: int = 0, workers: int = 0, batch_size: int = 8, **kw
) -> ShardBatches:
    args = {"captions_per_image": 2, "shuffle_buffer": 4, "max_skip_fraction": 0.6, **kw}
    return ShardBatches(urls, SIZE, batch_size, 7, "random", workers=workers, rank=rank, world=world, **args)


def ranks(urls: list[str], world: int, workers: int, **kw) -> list[ShardBatches]:
    return [make(urls, world, r, workers, **kw) for r in range(world)]


def together(parts: list[ShardBatches], epoch: int, start: int = 0) -> list[tuple]:
    """The ranks' local batches of an epoch, concatenated in rank order, with the merged state after
    each."""
    out = []
    for local in zip(*(p.epoch(epoch, start) for p in parts), strict=True):
        images = torch.cat([x for x, _, _ in local])
        captions = [c for _, caps, _ in local for c in caps]
        keys = [k for _, _, ks in local for k in ks]
        out.append((images, captions, keys, ShardBatches.merge_states([p.state() for p in parts])))
    return out


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for i, ((x, c, k, s), (y, d, m, t)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(x, y) and c == d and k == m, f"batch {i} differs"
        assert s == t, f"state after batch {i} differs"


@pytest.mark.parametrize(("world", "workers"), [(2, 1), (2, 2), (1, 0)])
def test_ranks_read_the_stream_of_one_process_with_as_many_streams(shards, world, workers):
    """N ranks × L streams == 1 process × N·L streams, batch for batch and state for state, over two
    epochs in which some streams wrap into further passes and skip broken samples."""
    parts = ranks(shards, world, workers)
    streams = world * max(1, workers)
    one = make(shards, workers=streams if workers else 1)
    assert parts[0].streams == one.streams == streams and len(parts[0]) == len(one) == 41 // 8
    for epoch in range(2):
        got = together(parts, epoch)
        want = together([one], epoch)
        assert_same(got, want)
    final = got[-1][3]
    assert max(p for p, _, _ in final["start"].values()) >= 1  # some stream wrapped into another pass
    skipped = sum(final["skipped_total"].values())
    assert skipped >= 2 and sum(p.skipped.total() for p in parts) == skipped
    keys = [k for _, _, ks, _ in got for k in ks]
    assert len(keys) == 40 and len(set(keys)) < 40  # uneven streams repeat some of their samples


def test_local_batches_have_the_local_size_and_differ_between_ranks(shards):
    a, b = ranks(shards, 2, 0)
    for (x, c, k), (y, d, m) in zip(a.epoch(0), b.epoch(0), strict=True):
        assert x.shape == y.shape == (4, 3, SIZE, SIZE) and len(c) == len(d) == 8
        assert not set(k) & set(m)  # disjoint shards within a pass


def test_merged_checkpoint_resumes_exactly_under_either_layout(shards, capsys):
    """Stop 2 ranks × 1 stream mid-epoch, at the end of an epoch and late in epoch 1 (after a stream
    wrapped into its next pass), merge their states and resume a fresh pair AND one process with 2
    streams: the next batches and states are those of the uninterrupted run, into the next epoch too."""
    kw = {"samples_per_epoch": 72}  # 9 batches: the streams' 14–27 samples wrap mid-epoch
    ref = ranks(shards, 2, 1, **kw)
    want = [together(ref, e) for e in range(2)]
    n = len(want[0])
    for epoch, k in ((0, 3), (0, n), (1, n - 2)):
        parts = ranks(shards, 2, 1, **kw)
        done = together(parts, 0) if epoch else []
        batches = iter(zip(*(p.epoch(epoch) for p in parts), strict=True))
        for _ in range(k):
            next(batches)
        saved = ShardBatches.merge_states([p.state() for p in parts])
        del batches
        assert_same(done, want[0] if epoch else [])
        if epoch:
            assert max(p for p, _, _ in saved["start"].values()) >= 1  # resumes in a later pass
        capsys.readouterr()
        for layout in (ranks(shards, 2, 1, **kw), [make(shards, workers=2, **kw)]):
            for p in layout:
                p.load_state(saved)
            assert_same(together(layout, epoch, k), want[epoch][k:])
            if epoch == 0:  # and on across the epoch boundary
                assert_same(together(layout, 1), want[1])
        assert "replaying" not in capsys.readouterr().out


def test_resume_under_another_stream_count_replays_with_a_note(shards, capsys):
    parts = ranks(shards, 2, 1)
    batches = zip(*(p.epoch(0) for p in parts), strict=True)
    next(batches), next(batches)
    saved = ShardBatches.merge_states([p.state() for p in parts])
    four = ranks(shards, 2, 2)  # S = 4 now
    for p in four:
        p.load_state(saved)
    assert_same(together(four, 0, 2), together(ranks(shards, 2, 2), 0)[2:])  # exact for the new layout
    assert "changed since the checkpoint" in capsys.readouterr().out


def test_each_rank_decodes_only_its_share(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, 256, 32)
    decoded = []
    real = shard_streams.decode_record
    monkeypatch.setattr(
        shard_streams, "decode_record", lambda r, size: decoded.append(r.key) or real(r, size)
    )
    rank = make(urls, world=4, rank=1)
    batches = list(rank.epoch(0))
    used = sum(len(k) for _, _, k in batches)
    assert used == 2 * len(rank) == 64
    assert used <= len(decoded) <= used + shard_streams.CHUNK  # not the global 256


def test_fewer_shards_than_ranks_or_streams(shards, capsys):
    with pytest.raises(
        UserError, match=r"^6 ranks need at least 6 shards.*--shard-size\) or use fewer ranks\.$"
    ):
        make(shards, world=6, batch_size=6)
    with pytest.raises(UserError, match=r"batch_size=8 does not split evenly over 3 ranks"):
        make(shards, world=3)
    capsys.readouterr()
    parts = ranks(shards, 2, 4)  # 5 shards: 2 streams per rank, not 4
    assert all(p.streams == 4 and p.workers == 2 for p in parts)
    assert capsys.readouterr().out.count("data.workers=4") == 1  # one note, from rank 0
    # a rank batch of 2 over 4 streams would leave two of them idle (their shards unread all epoch):
    # lowered to 2 streams that take 1 sample each; 3 workers for a batch of 4 → 2 streams of 2
    for batch_size, workers, streams in ((4, 4, 2), (8, 3, 2), (8, 2, 2)):
        part = make(many_shards(shards), world=2, workers=workers, batch_size=batch_size)
        assert part.streams == 2 * streams, (batch_size, workers)


def many_shards(shards: list[str]) -> list[str]:
    """The module's shards, plus copies: enough shards that only the batch limits the streams."""
    return shards * 4


def test_a_stream_without_a_usable_sample_stops_with_one_sentence(tmp_path):
    urls = write_shards(tmp_path / "bad", 12, 4, broken=tuple(range(12)))
    for workers in (0, 1):
        with pytest.raises(UserError, match=r"^No usable sample in the training shards 0000\d\.tar") as e:
            list(make(urls, workers=workers, max_skip_fraction=100.0).epoch(0))
        assert "(12 not_an_image)" in str(e.value) and "\n" not in str(e.value)
    mixed = write_shards(tmp_path / "mixed", 8, 4, broken=tuple(range(4)))  # one stream's shard is broken
    with pytest.raises(UserError, match=r"No usable sample in the training shards 00000\.tar \("):
        for p in ranks(mixed, 2, 0, max_skip_fraction=100.0):
            list(p.epoch(0))
