"""Fuzzing the data layer with hypothesis: mutated image bytes, caption cells and tar shards never
crash it, every usable sample decodes to the right shape, and every broken one is counted.

Deterministic (derandomize) and fast: tiny images, no example database."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from lipkit.data.convert import image_bytes
from lipkit.data.image_policy import IMAGE_REASONS
from lipkit.data.images import try_load_image
from lipkit.data.records import REASONS, Record, Skip
from lipkit.data.shard_streams import ShardStream, StreamSpec
from lipkit.data.sources.registry import read_records
from lipkit.data.sources.shards import scan_shards

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lipkit-hypothesis")  # not .hypothesis/ in the repo
FAST = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CASES = {"images": 2000, "rows": 400, "tars": 700}


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (7, 9, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (6, 6, 4), dtype=np.uint8), "RGBA")
    pal = rgb.convert("P")
    return [
        _encode(rgb, "PNG"),
        _encode(rgba, "PNG"),
        _encode(pal, "PNG", transparency=3),
        _encode(rgb.convert("L"), "PNG"),
        _encode(rgba.convert("LA"), "PNG"),
        _encode(Image.fromarray(rng.integers(0, 65535, (5, 5), dtype=np.uint16)), "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(pal, "GIF"),
        _encode(rgb, "BMP"),
        _encode(rgb, "WEBP"),
        _encode(rgba, "WEBP", lossless=True),
        _encode(rgb, "TIFF"),
        _encode(rgb.convert("1"), "PNG"),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    kind = draw(
        st.sampled_from(["truncate", "flip", "insert", "delete", "garbage", "empty", "none", "header"])
    )
    pos = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "truncate":
        del data[pos:]
    elif kind == "flip":
        for p in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=6)):
            data[p] ^= draw(st.integers(1, 255))
    elif kind == "insert":
        data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
    elif kind == "delete":
        del data[pos : pos + draw(st.integers(1, 40))]
    elif kind == "garbage":
        data = bytearray(draw(st.binary(max_size=200)))
    elif kind == "empty":
        data = bytearray()
    elif kind == "header":  # damage the first bytes, where formats keep sizes and magic numbers
        p = draw(st.integers(0, min(40, len(data) - 1)))
        data[p] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture()
def small_pixel_limit():
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000  # a mutated header can claim a huge image: keep the fuzz fast
    yield
    Image.MAX_IMAGE_PIXELS = old


@settings(FAST, max_examples=CASES["images"])
@given(data=mutated(SEEDS))
def test_fuzz_image_bytes(small_pixel_limit, data):
    image, reason, detail = try_load_image(data, 8)
    event(f"image: {reason or 'decoded'}")
    if image is None:
        assert reason in IMAGE_REASONS and detail
    else:
        assert reason == "" and image.shape == (3, 8, 8) and image.dtype == torch.uint8
    converted = image_bytes(Record(Path("x"), ["c"], data=data), verify=True, size=8)
    assert isinstance(converted, Skip) == (image is None), (reason, converted)  # convert agrees with training
    if isinstance(converted, Skip):
        assert converted.reason in IMAGE_REASONS


caption_values = st.one_of(
    st.text(max_size=20),
    st.lists(st.one_of(st.text(max_size=12), st.integers(), st.none()), max_size=4),
    st.integers(),
    st.none(),
    st.just("   "),
    st.just(["", " \t"]),
)
raw_line = st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"\r" not in b)
row = st.one_of(
    st.builds(
        lambda c, img: json.dumps({"image": img, "captions": c}),
        caption_values,
        st.sampled_from(["a.png", "", "b/c.jpg"]),
    ),
    raw_line.map(lambda b: b.decode("latin-1")),  # text that is probably not JSON
    raw_line.map(lambda b: b'{"image": "a.png", "captions": ["' + b + b'"]}'),  # raw bytes in a caption
)


@settings(FAST, max_examples=CASES["rows"])
@given(lines=st.lists(st.one_of(row, raw_line), min_size=1, max_size=12))
def test_fuzz_table_rows(tmp_path, lines):
    body = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape") for x in lines)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"image": "first.png", "captions": "ok"}\n' + body + b"\n")
    records, skipped = read_records(path)
    for reason in skipped:
        event(f"row skipped: {reason}")
    rows = 1 + sum(1 for x in body.split(b"\n") if x.decode("utf-8", "surrogateescape").strip())
    assert len(records) + sum(skipped.values()) == rows  # every row is used or counted
    assert set(skipped) <= set(REASONS)
    for r in records:
        assert r.captions and all(c.strip() == c and c for c in r.captions)
        for c in r.captions:
            c.encode("utf-8")  # valid text, ready for the tokenizer


def _tar(samples: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, img, caption in samples:
            for ext, data in (("png", img), ("txt", caption), ("json", json.dumps({"n": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SAMPLES = [(f"{i:04d}", SEEDS[i % 5], f"caption {i}".encode()) for i in range(6)]
SHARD = _tar(SAMPLES)


@st.composite
def mutated_tar(draw: st.DrawFn) -> bytes:
    data = bytearray(SHARD)
    kind = draw(
        st.sampled_from(["truncate", "flip", "zero-block", "random-block", "append", "delete", "none"])
    )
    pos = draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        del data[pos:]
    elif kind == "flip":
        for p in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            data[p] ^= draw(st.integers(1, 255))
    elif kind in ("zero-block", "random-block"):
        start = draw(st.integers(0, len(data) // 512 - 1)) * 512
        fill = bytes(512) if kind == "zero-block" else draw(st.binary(min_size=512, max_size=512))
        data[start : start + 512] = fill
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=600))
    elif kind == "delete":
        del data[pos : pos + draw(st.integers(1, 700))]
    return bytes(data)


@settings(FAST, max_examples=CASES["tars"])
@given(data=mutated_tar())
def test_fuzz_tar_shards(tmp_path, data):
    url = str(tmp_path / "00000.tar")
    Path(url).write_bytes(data)
    n = len(SAMPLES)
    spec = StreamSpec([url], 1, 8, 0, 0, 0, 4, "captions", [], [], {url: n})
    ok, skipped = [], 0
    for _, items, images in ShardStream(spec):
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
        assert images.shape[0] == sum(1 for x in items if x[0] == "ok")
        for item in items:
            if item[0] == "ok":
                ok.append(item[3])
                assert item[4] and all(isinstance(c, str) and c for c in item[4])
            elif item[0] == "skip":
                assert item[3] in REASONS
                skipped += item[6]
                event(f"tar skip: {item[3]}")
            else:
                assert item[0] == "end"
    assert ok + [] == [k for k in ok if k in {key for key, _, _ in SAMPLES}]
    event(f"tar: {len(ok)} of {n} samples usable")
    assert len(ok) + skipped >= n  # nothing vanishes: a lost sample is counted, if only as part of a shard
    if data == SHARD:
        assert sorted(ok) == [key for key, _, _ in SAMPLES] and skipped == 0
    # `lipkit data validate` reads shards the same way
    scanned = list(scan_shards(url))
    assert sum(1 for x in scanned if isinstance(x, Record)) >= len(ok)
