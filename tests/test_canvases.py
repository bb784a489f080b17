"""`lipkit data build canvases`: boxes, masks, captions and columns agree with what was pasted; the build is
deterministic, reused, and refuses what it must not touch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lipkit.cli import app
from lipkit.data.builtin.canvases import CanvasOptions, build_canvases, join_names, parse_range
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError

SMALL = CanvasOptions(size=96, train_canvases=12, test_canvases=6)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sources(table: Path) -> dict[str, Path]:
    return {"train": table, "test": table.parent / "test-style.jsonl"}


@pytest.fixture(scope="module")
def canvases(table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("canvases") / "c"
    build_canvases(out, sources(table), SMALL, progress=False)
    return out


def test_boxes_masks_and_captions_describe_what_was_pasted(table, canvases):
    by_key = {r.key: r for split in sources(table).values() for r in read_table(split)}
    for split, count in (("train", 12), ("test", 6)):
        got = rows(canvases / f"{split}.jsonl")
        assert len(got) == count
        for row in got:
            n = len(row["boxes"])
            assert SMALL.min_objects <= n <= SMALL.max_objects
            objs = [by_key[k] for k in row["object_keys"]]
            names = [" ".join(r.captions[0].split()) for r in objs]
            assert row["object_captions"] == names and len({x.casefold() for x in names}) == n
            assert row["captions"] == [join_names(names)]
            assert row["langs"] == [objs[0].meta["langs"][0]]  # the names' language (first captions)
            for col in ("label", "subcategory", "category"):  # text columns → one entry per object
                assert row[col] == [r.meta[col] for r in objs]
            mask = np.array(Image.open(canvases / row["mask"]))
            image = np.array(Image.open(canvases / row["image"]))
            assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
            assert set(np.unique(mask)) <= set(range(n + 1))
            for k, box in enumerate(row["boxes"], start=1):
                x0, y0, x1, y1 = (round(v * 96) for v in box)
                ys, xs = np.nonzero(mask == k)
                assert len(ys), f"object {k} of {row['key']} is hidden"
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
                if k == n:  # drawn last, so nothing covers it: its mask spans its box exactly
                    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            outside = np.ones((96, 96), bool)  # one colour outside every box (edges inside may blend)
            for box in row["boxes"]:
                x0, y0, x1, y1 = (round(v * 96) for v in box)
                outside[y0:y1, x0:x1] = False
            background = image[outside]
            assert (background == background[0]).all() and (mask[outside] == 0).all()


def test_build_is_deterministic_reused_and_seeded(table, canvases, tmp_path):
    again = tmp_path / "again"
    build_canvases(again, sources(table), SMALL, progress=False)
    for name in ("train.jsonl", "test.jsonl", "images/train/train-000003.png", "masks/test/test-000002.png"):
        assert (again / name).read_bytes() == (canvases / name).read_bytes()
    stamp = (again / "summary.json").stat().st_mtime_ns
    build_canvases(again, sources(table), SMALL, progress=False)  # the same build: reused, not rewritten
    assert (again / "summary.json").stat().st_mtime_ns == stamp
    other = CanvasOptions(**{**SMALL.__dict__, "seed": 1})
    build_canvases(again, sources(table), other, progress=False)  # other options: rebuilt
    assert (again / "train.jsonl").read_bytes() != (canvases / "train.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 16}, "--size"),
        ({"min_objects": 3, "max_objects": 2}, "--objects"),
        ({"min_scale": 0.5, "max_scale": 0.3}, "--scale"),
        ({"max_overlap": 1.5}, "--max-overlap"),
        ({"train_canvases": 0}, "--train-canvases"),
    ],
)
def test_bad_options_are_one_sentence(table, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        build_canvases(tmp_path / "x", sources(table), CanvasOptions(**options), progress=False)


def test_refuses_folders_it_must_not_touch_and_too_few_names(table, tmp_path):
    with pytest.raises(UserError, match="holds the source table"):
        build_canvases(table.parent, sources(table), SMALL, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a canvases build"):
        build_canvases(tmp_path / "other", sources(table), SMALL, progress=False)
    assert (tmp_path / "other" / "mine.txt").read_text() == "keep me"
    one = tmp_path / "one.jsonl"
    one.write_text(table.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="distinct object names"):
        build_canvases(tmp_path / "y", {"train": one, "test": one}, SMALL, progress=False)


def test_ranges_and_names():
    assert parse_range("2-4", "--objects") == (2, 4) and parse_range("3", "--objects") == (3, 3)
    assert parse_range("0.2-0.5", "--scale", float) == (0.2, 0.5)
    with pytest.raises(UserError, match="MIN-MAX"):
        parse_range("two", "--objects")
    assert join_names(["a"]) == "a" and join_names(["a", "b", "c"]) == "a, b and c"
    assert join_names(["flag: x", "man, tall"]) == "flag: x; man, tall"


def test_cli_builds_and_names_what_it_wrote(table, tmp_path):
    out = tmp_path / "cli"
    args = ["data", "build", "canvases", "--out", str(out), "--size", "64", "--objects", "1-2"]
    args += ["--source", str(table), "--test-source", str(table.parent / "test-style.jsonl")]
    r = CliRunner().invoke(app, [*args, "--train-canvases", "3", "--test-canvases", "2"])
    assert r.exit_code == 0, r.output
    assert "3 training canvases" in " ".join(r.output.split()) and len(rows(out / "test.jsonl")) == 2
    r = CliRunner().invoke(app, ["data", "build", "pictures"])
    assert isinstance(r.exception, UserError) and "'canvases'" in str(r.exception)  # main() prints it


def test_source_columns_never_replace_the_canvas_fields_and_impossible_layouts_are_refused(table, tmp_path):
    src = tmp_path / "keyed.jsonl"
    lines = []
    for i, row in enumerate(rows(table)):
        row["image"] = str(table.parent / row["image"])  # absolute: the copy lives elsewhere
        lines.append(json.dumps({**row, "key": f"k{i}", "mask": "m", "boxes": "b", "object_keys": "o"}))
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "c"
    build_canvases(
        out,
        {"train": src, "test": src},
        CanvasOptions(size=64, train_canvases=4, test_canvases=2),
        progress=False,
    )
    for row in rows(out / "train.jsonl"):
        assert row["key"].startswith("train-") and row["mask"].startswith("masks/")
        assert isinstance(row["boxes"][0], list) and row["object_keys"][0].startswith("k")
    crowded = CanvasOptions(
        size=64, min_objects=8, max_objects=8, min_scale=0.9, max_scale=1.0, max_overlap=0.0
    )
    with pytest.raises(UserError, match="do not fit"):
        build_canvases(tmp_path / "d", {"train": src, "test": src}, crowded, progress=False)
