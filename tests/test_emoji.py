"""The emoji dataset builder, on fake npm tarballs (no network, no npm)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from emoji_fixture import make_fixture_packages
from lipkit.data import emoji
from lipkit.data.emoji import SPLITS, build_emoji
from lipkit.errors import UserError

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="fake npm is a shell script")


def read_tables(out: Path) -> dict[str, list[dict]]:
    return {
        s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text("utf-8").splitlines()] for s in SPLITS
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    make_fixture_packages(root / "packages")
    return root


@pytest.fixture(scope="module")
def built(cache: Path) -> tuple[Path, dict]:
    out = cache.parent / "emoji-out"
    return out, build_emoji(out, cache_dir=cache, progress=True)


def test_splits_by_concept_and_style(built: tuple[Path, dict]) -> None:
    out, _ = built
    t = read_tables(out)
    concepts = {s: {r["concept"] for r in rows} for s, rows in t.items()}
    assert concepts["train"] and concepts["test-novel"]
    assert not concepts["train"] & concepts["test-novel"]
    assert concepts["test-style"] == concepts["train"]
    assert {r["style"] for r in t["train"]} == {"google", "twitter"}
    assert {r["style"] for r in t["test-style"]} == {"facebook"}
    assert {r["style"] for r in t["test-novel"]} == {"google", "twitter", "facebook"}
    assert len(t["train"]) == 2 * len(t["test-style"])


def test_rows_images_and_captions(built: tuple[Path, dict]) -> None:
    out, _ = built
    rows = [r for rows in read_tables(out).values() for r in rows]
    for r in rows:
        assert r["image"] == f"images/{r['style']}/{Path(r['image']).name}"
        with Image.open(out / r["image"]) as im:
            assert im.size == (64, 64)
        assert len(r["captions"]) >= 3 and len(r["langs"]) == len(r["captions"])
        assert r["langs"][:3] == ["en", "en", "en"] and all(c.strip() for c in r["captions"])
        assert r["captions"][0] == r["label"]
        assert r["captions"][2] == f"{r['label']} ({r['subcategory']}, {r['category']})"
    written = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert written == {r["image"] for r in rows}  # nothing extra, e.g. sprite sheets or partial emoji
    assert "1F907" not in {r["concept"] for r in rows}  # no facebook image -> left out
    assert not [r for r in rows if r["image"].endswith("1f900-1f3ff.png")]  # no twitter image


def test_skin_variants_share_the_concept(built: tuple[Path, dict]) -> None:
    out, _ = built
    rows = [r for rows in read_tables(out).values() for r in rows]
    skins = [r for r in rows if "-1f3f" in r["image"]]
    assert skins
    for r in skins:
        base = Path(r["image"]).name.split("-1f3f")[0].upper()
        assert r["concept"] == base and ": " in r["label"] and "skin tone" in r["label"]
    by_concept = {r["concept"] for r in skins}
    assert all(any(r["concept"] == c and "-1f3f" not in r["image"] for r in rows) for c in by_concept)


def test_labels_languages_and_fallbacks(built: tuple[Path, dict]) -> None:
    out, _ = built
    rows = {(r["concept"], r["style"]): r for rows in read_tables(out).values() for r in rows}
    fe0f = rows["1F903-FE0F", "google"]  # emoji.json has -FE0F, emojibase does not
    assert fe0f["label"] == "red diamond" and fe0f["subcategory"] == "diamond shape"
    assert "rot Raute" in fe0f["captions"] and "赤い 菱形" in fe0f["captions"]
    assert fe0f["captions"][1] == "red, diamond, shape, boxes"
    assert fe0f["langs"] == ["en", "en", "en", "de", "es", "fr", "it", "ja", "pt", "ru", "zh"]
    assert rows["1F901", "google"]["label"] == "red ring"  # not in emojibase: emoji.json name
    assert "it" not in rows["1F902", "google"]["langs"]  # Italian label missing for this one
    line = (out / "train.jsonl").read_text("utf-8")
    assert "赤い" in line  # UTF-8, not \\u escapes


def test_summary(built: tuple[Path, dict]) -> None:
    out, summary = built
    t = read_tables(out)
    assert json.loads((out / "summary.json").read_text("utf-8")) == summary
    assert summary["images"] == {s: len(rows) for s, rows in t.items()}
    assert summary["captions"] == sum(len(r["captions"]) for rows in t.values() for r in rows)
    assert summary["concepts"]["novel"] == len({r["concept"] for r in t["test-novel"]})
    assert summary["concepts"]["train"] == len({r["concept"] for r in t["train"]})
    assert len(summary["categories"]) == 4 and len(summary["subcategories"]) == 8
    assert summary["languages"][0] == "en" and "ja" in summary["languages"]


def test_second_build_reuses(built: tuple[Path, dict], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, summary = built
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.json*")}

    def no_fetch(*_: object) -> dict:
        raise AssertionError("rebuilt instead of reusing")

    monkeypatch.setattr(emoji, "fetch_packages", no_fetch)
    assert build_emoji(out, cache_dir=cache, progress=False) == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json*")} == mtimes


def test_deterministic_and_offline(
    built: tuple[Path, dict], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # tarballs are cached: npm is not needed
    out, _ = built
    again = build_emoji(tmp_path / "again", cache_dir=cache, progress=False)
    for s in SPLITS:
        assert (tmp_path / "again" / f"{s}.jsonl").read_bytes() == (out / f"{s}.jsonl").read_bytes()
    other = build_emoji(tmp_path / "other", cache_dir=cache, seed=1, progress=False)
    novel = {r["concept"] for r in read_tables(tmp_path / "other")["test-novel"]}
    assert novel != {r["concept"] for r in read_tables(out)["test-novel"]}
    assert other["concepts"] == again["concepts"]


def test_changed_options_rebuild(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    build_emoji(out, cache_dir=cache, progress=False)
    summary = build_emoji(out, cache_dir=cache, skin_tones=False, languages=("de",), progress=False)
    rows = [r for rows in read_tables(out).values() for r in rows]
    assert summary["languages"] == ["en", "de"] and {lang for r in rows for lang in r["langs"]} == {
        "en",
        "de",
    }
    assert not [r for r in rows if "-1f3f" in r["image"]]
    assert not list((out / "images").rglob("*-1f3f*.png"))  # stale skin images removed
    assert build_emoji(out, cache_dir=cache, skin_tones=False, languages=("de",), force=True) == summary


def test_bad_options(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="novel_fraction"):
        build_emoji(tmp_path, cache_dir=cache, novel_fraction=1.0, progress=False)
    with pytest.raises(UserError, match="xx"):
        build_emoji(tmp_path, cache_dir=cache, languages=("xx",), progress=False)


def test_missing_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(UserError, match="npm") as err:
        build_emoji(tmp_path / "out", cache_dir=tmp_path, progress=False)
    assert str(tmp_path / "packages") in str(err.value)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_corrupt_tarball(cache: Path, tmp_path: Path) -> None:
    shutil.copytree(cache / "packages", tmp_path / "packages")
    bad = next((tmp_path / "packages").glob("emoji-datasource-twitter-*.tgz"))
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated download
    with pytest.raises(UserError, match=bad.name):
        build_emoji(tmp_path / "out", cache_dir=tmp_path, progress=False)


def fake_npm(bin_dir: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


@posix_only
def test_npm_failure_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_npm(tmp_path / "bin", "echo 'npm error code ENOTFOUND' >&2\nexit 1\n", monkeypatch)
    with pytest.raises(UserError, match="npm pack.*ENOTFOUND"):
        build_emoji(tmp_path / "out", cache_dir=tmp_path, progress=False)


@posix_only
def test_npm_pack_fetches_missing_packages(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIXTURE_PACKAGES", str(cache / "packages"))
    fake_npm(
        tmp_path / "bin", 'shift\nfor n in "$@"; do cp "$FIXTURE_PACKAGES/$n"-*.tgz .; done\n', monkeypatch
    )
    (tmp_path / "packages").mkdir()
    shutil.copy(next((cache / "packages").glob("emojibase-data-*.tgz")), tmp_path / "packages")  # one cached
    summary = build_emoji(tmp_path / "out", cache_dir=tmp_path, progress=False)
    assert summary["images"]["train"] > 0
    assert sorted(p.name for p in (tmp_path / "packages").iterdir()) == sorted(
        p.name for p in (cache / "packages").iterdir()
    )
