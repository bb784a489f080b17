"""Data sources: every format reads the same records; bad rows and images are skipped and counted by
reason; odd image modes decode to the right colours; the cached and streaming loaders never crash."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lipkit.data.convert import convert
from lipkit.data.image_store import ImageStore
from lipkit.data.images import load_image, try_load_image
from lipkit.data.sources.registry import read_records, read_table, source_kind
from lipkit.data.table_batches import TrainBatches
from lipkit.errors import UserError


def png(color=(200, 30, 30), size=(12, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_rows(root: Path, n: int = 12) -> list[dict]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(png((20 * i % 256, 100, 50)))
        caps = [f"thing {i}", f"object number {i}"][: 1 + i % 2]
        rows.append(
            {"image": f"img/{i}.png", "captions": caps, "label": f"c{i % 3}", "langs": ["en"] * len(caps)}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["image", "captions", "label"], delimiter=delimiter)
        w.writeheader()
        for r in rows:
            w.writerow({"image": r["image"], "captions": json.dumps(r["captions"]), "label": r["label"]})
    return path


def as_set(records) -> Counter:
    return Counter((r.key, tuple(r.captions)) for r in records)


@pytest.fixture()
def rows(tmp_path) -> list[dict]:
    return write_rows(tmp_path)


def test_every_format_reads_the_same_records(tmp_path, rows):
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    want = as_set(read_table(jsonl))
    assert len(want) == 12 and source_kind(jsonl).name == "table"
    assert as_set(read_table(write_csv(tmp_path / "t.csv", rows))) == want
    assert as_set(read_table(write_csv(tmp_path / "t.tsv", rows, "\t"))) == want
    # parquet with the image bytes inline (key column = the path) and with a path column
    table = pa.table(
        {
            "image": [(tmp_path / r["image"]).read_bytes() for r in rows],
            "captions": [r["captions"] for r in rows],
            "key": [str(tmp_path / r["image"]) for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "bytes.parquet", row_group_size=5)
    got = read_records(tmp_path / "bytes.parquet")[0]
    assert as_set(got) == want and all(r.data for r in got)
    pq.write_table(
        pa.table({"image": [r["image"] for r in rows], "captions": [r["captions"] for r in rows]}),
        tmp_path / "p.parquet",
    )
    assert source_kind(tmp_path / "p.parquet").name == "parquet"
    assert as_set(read_records(tmp_path / "p.parquet")[0]) == want
    # a folder with sidecar captions
    folder = tmp_path / "folder"
    folder.mkdir()
    for r in rows:
        name = Path(r["image"]).stem
        (folder / f"{name}.png").write_bytes((tmp_path / r["image"]).read_bytes())
        (folder / f"{name}.json").write_text(json.dumps({"captions": r["captions"]}))
    assert source_kind(folder).name == "folder"
    assert sorted(tuple(r.captions) for r in read_records(folder)[0]) == sorted(c for _, c in want)
    # shards written by convert keep the source's keys
    report = convert(jsonl, tmp_path / "shards", shard_size=5, progress=False)
    assert report.samples == 12 and report.extra["shards"] == 3
    pattern = report.extra["pattern"]
    assert source_kind(pattern).name == "shards" and pattern.endswith("{00000..00002}.tar")
    assert as_set(read_records(pattern)[0]) == want
    assert as_set(read_records(tmp_path / "shards")[0]) == want  # a folder of shards
    # the decoded images agree across formats
    store_a = ImageStore(read_table(jsonl), 8, cache=True)
    by_key = {r.key: i for i, r in enumerate(store_a.records)}
    shard_records = read_records(pattern)[0]
    store_b = ImageStore(shard_records, 8, cache=True)
    for j, r in enumerate(shard_records):
        assert torch.equal(store_b.cache[j], store_a.cache[by_key[r.key]])


def test_bad_rows_are_skipped_and_counted(tmp_path, rows):
    lines = [json.dumps(r) for r in rows[:4]]
    lines += [
        "{not json",
        json.dumps({"image": "img/5.png", "captions": ["  ", ""]}),  # whitespace only
        json.dumps({"image": "img/6.png", "captions": []}),
        json.dumps({"image": "", "captions": ["no image"]}),
        json.dumps({"image": "img/7.png", "captions": 42}),  # a number is a caption "42"
        "[1, 2]",
    ]
    raw = "\n".join(lines).encode() + b'\n{"image": "img/8.png", "captions": ["caf\xe9 latin-1"]}\n'
    (tmp_path / "t.jsonl").write_bytes(raw)
    records, skipped = read_records(tmp_path / "t.jsonl")
    assert len(records) == 5 and records[-1].captions == ["42"]
    assert skipped == {"bad_row": 2, "no_caption": 2, "no_image": 1, "bad_text": 1}
    with pytest.warns(
        UserWarning, match=r"skipped 6 rows \(2 bad_row, 2 no_caption, 1 bad_text, 1 no_image\)"
    ):
        assert len(read_table(tmp_path / "t.jsonl")) == 5
    # CSV: a non-UTF-8 cell, a ragged row; a BOM is fine
    body = "\ufeffimage,captions\nimg/0.png,a cat\nimg/1.png,caf\udce9\nimg/2.png,x,extra\n"
    (tmp_path / "t.csv").write_bytes(body.encode("utf-8", "surrogateescape"))
    records, skipped = read_records(tmp_path / "t.csv")
    assert [r.captions for r in records] == [["a cat"]] and skipped == {"bad_text": 1, "bad_row": 1}


def test_table_level_problems_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "t.jsonl").write_text(json.dumps({"img": "a.png", "captions": "x"}) + "\n")
    with pytest.raises(UserError, match="has no column 'image'"):
        read_records(tmp_path / "t.jsonl")
    with pytest.raises(UserError, match="names no shards|None of the"):
        read_records(tmp_path / "nothing-{000..003}.tar")


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's header)."""
    data = bytearray(png(0, size=(1, 1), mode="L"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_bad_images_are_named_by_reason(tmp_path):
    good = png()
    cases = {
        "missing_file": tmp_path / "nope.png",
        "empty_file": b"",
        "not_an_image": b"<html>this is not a png</html>",
        "corrupt_image": good[: len(good) // 2],
        "too_large": _png_with_size(20_000, 20_000),
    }
    (tmp_path / "text.png").write_text("hello")
    for reason, src in cases.items():
        img, got, detail = try_load_image(src, 8)
        assert img is None and got == reason, (reason, got, detail)
    assert try_load_image(tmp_path / "text.png", 8)[1] == "not_an_image"
    (tmp_path / "zero.png").write_bytes(b"")
    assert try_load_image(tmp_path / "zero.png", 8)[1] == "empty_file"
    img, reason, _ = try_load_image(good, 8)
    assert reason == "" and img.shape == (3, 8, 8) and img.dtype == torch.uint8


def test_odd_image_modes_convert_correctly():
    def decode(im: Image.Image, fmt: str = "PNG", **kw) -> np.ndarray:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return load_image(buf.getvalue(), 4).permute(1, 2, 0).numpy().astype(int)

    assert (decode(Image.new("RGBA", (6, 6), (255, 0, 0, 0))) == 255).all()  # transparent -> white
    half = decode(Image.new("RGBA", (6, 6), (0, 0, 0, 128)))
    assert (abs(half - 127) <= 1).all()  # half-transparent black on white
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    assert (decode(pal, transparency=1) == 255).all()  # palette + transparency
    assert (decode(pal) == [0, 0, 255]).all()  # palette, opaque
    grey16 = Image.fromarray(np.full((6, 6), 32896, dtype=np.uint16))  # 16-bit mid grey
    assert (abs(decode(grey16) - 128) <= 1).all()
    cmyk = decode(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    assert (cmyk[..., 0] > 200).all() and (cmyk[..., 1:] < 60).all()
    assert (decode(Image.new("LA", (6, 6), (0, 0))) == 255).all()
    assert (decode(Image.new("1", (6, 6), 1)) == 255).all()
    assert (abs(decode(Image.new("F", (6, 6), 0.5), "TIFF") - 128) <= 1).all()
    # EXIF orientation 6 (rotate 90°): a 8x4 landscape with a red left half shows red on top
    im = Image.new("RGB", (8, 4), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    top = load_image(buf.getvalue(), 4)[:, 0, :].T.numpy().astype(int)  # first row
    assert (top[:, 0] > 200).all() and (top[:, 2] < 60).all()


def test_cached_store_drops_bad_rows_in_place_and_training_counts_them(tmp_path, rows):
    rows = rows + [
        {"image": "img/missing.png", "captions": ["gone"]},
        {"image": "img/bad.png", "captions": ["x"]},
    ]
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    records = read_table(write_jsonl(tmp_path / "t.jsonl", rows))
    store = ImageStore(records, 8, cache=True)
    assert len(records) == 12 and store.cache.shape[0] == 12  # the caller's list stays aligned
    assert store.skipped == {"missing_file": 1, "corrupt_image": 1}
    logged = []
    full = read_table(tmp_path / "t.jsonl")
    with pytest.raises(UserError, match=r"Skipped 2 of 14 samples .* data.max_skip_fraction=0.1"):
        TrainBatches(full, 8, 4, seed=0, max_skip_fraction=0.1)
    batches = TrainBatches(full, 8, 4, seed=0, max_skip_fraction=0.2, log=logged.append)
    assert batches.skipped == {"missing_file": 1, "corrupt_image": 1} and len(batches) == 3
    keys = [k for _, _, ks in batches.epoch(0) for k in ks]
    assert len(keys) == 12 and not {"missing.png", "bad.png"} & {Path(k).name for k in keys}
    assert logged == [
        {"kind": "data", "step": 0, "epoch": 0, "skipped": {"missing_file": 1, "corrupt_image": 1}}
    ]


def test_streaming_map_loader_keeps_batches_full_and_resumes_exactly(tmp_path, rows):
    rows = rows + [{"image": f"img/missing{i}.png", "captions": ["gone"]} for i in range(2)]
    records = read_table(write_jsonl(tmp_path / "t.jsonl", rows))
    logged = []
    b = TrainBatches(records, 8, 4, seed=1, cache=False, max_skip_fraction=0.3, log=logged.append)
    assert len(b) == 3  # 14 rows // 4: the missing ones are only found while streaming
    run = []
    for e in range(2):
        for images, captions, keys in b.epoch(e):
            assert images.shape == (4, 3, 8, 8) and len(captions) == 4
            run.append(keys)
    assert sum(x["skipped"].get("missing_file", 0) for x in logged if x["epoch"] == 0) >= 1
    assert b.skipped["missing_file"] >= 2
    # resume at every batch of epoch 1, from the saved state or by replay: the same batches
    for start in range(3):
        again = TrainBatches(records, 8, 4, seed=1, cache=False, max_skip_fraction=0.3)
        gen = again.epoch(1)
        state = None
        for _ in range(start):
            next(gen)
            state = again.state()
        fresh = TrainBatches(records, 8, 4, seed=1, cache=False, max_skip_fraction=0.3)
        fresh.load_state(state)
        assert [k for _, _, k in fresh.epoch(1, start)] == run[3 + start :]
        replay = TrainBatches(records, 8, 4, seed=1, cache=False, max_skip_fraction=0.3)
        assert [k for _, _, k in replay.epoch(1, start)] == run[3 + start :]


def test_caption_select_then_languages():
    from lipkit.data.captions import filter_captions
    from lipkit.data.records import Record

    r = Record(
        Path("a.png"), ["label", "tags", "label (group)", "Etikett"], {"langs": ["en", "en", "en", "de"]}
    )
    (out,) = filter_captions([r], [2, 0, 3, 9], ["en"])
    assert out.captions == ["label (group)", "label"] and out.meta["langs"] == ["en", "en"]
    (out,) = filter_captions([r], [3], [])
    assert out.captions == ["Etikett"] and out.meta["langs"] == ["de"]
    assert filter_captions([r], [3], ["en"]) == []  # nothing left: the row is dropped
    assert filter_captions([r], [], []) == [r]


def test_meta_captions_are_appended_from_the_rows_columns(tmp_path):
    import pytest

    from lipkit.config import DataConfig
    from lipkit.data.captions import check_meta_templates, filter_captions
    from lipkit.data.records import Record
    from lipkit.data.sources.registry import open_train_data
    from lipkit.errors import UserError

    r = Record(Path("a.png"), ["label", "Etikett"], {"langs": ["en", "de"], "group": "faces", "kind": ""})
    (out,) = filter_captions([r], [], ["en"], ["a {group} emoji", "{kind} thing", "{missing}"])
    assert out.captions == ["label", "a faces emoji"] and out.meta["langs"] == ["en", "meta"]
    with pytest.raises(UserError, match="names no column"):
        check_meta_templates(["no columns here"])
    with pytest.raises(UserError, match="not a format string"):
        check_meta_templates(["a {group emoji"])
    # from a table: a template that fills nothing anywhere is a clear error naming the columns there are
    (tmp_path / "a.png").write_bytes(b"")
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png", "captions": ["x", "y"], "group": "faces"}\n', encoding="utf-8")
    d = DataConfig(train=str(table), meta_captions=["an emoji of {group}"], caption_select=[1])
    assert open_train_data(d).records[0].captions == ["y", "an emoji of faces"]
    with pytest.raises(UserError, match="group"):  # also when the selection drops captions
        open_train_data(
            DataConfig(train=str(table), meta_captions=["an emoji of {grop}"], caption_select=[1])
        )


def test_a_source_is_known_by_its_name_before_its_contents(tmp_path):
    """The name decides first (a folder called x.parquet is parquet whatever it holds); a plain folder is
    parquet when it holds parquet files (even beside .tar files), shards when it holds .tar files, and a
    folder of images otherwise."""
    named = tmp_path / "x.parquet"
    named.mkdir()
    (named / "a.tar").write_bytes(b"")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.tar").write_bytes(b"")
    (mixed / "b.parquet").write_bytes(b"")
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "a.tar").write_bytes(b"")
    kinds = {p.name: source_kind(p).name for p in (named, mixed, tars, tmp_path / "t.csv")}
    assert kinds == {"x.parquet": "parquet", "mixed": "parquet", "tars": "shards", "t.csv": "table"}
    assert source_kind("pipe:cat a.tar").name == "shards" and source_kind("s/{0..3}.tar").name == "shards"
    with pytest.raises(UserError, match="pipe:"):
        source_kind("https://example.com/pairs.csv")
