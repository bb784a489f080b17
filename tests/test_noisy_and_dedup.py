"""`lipkit data build noisy` (the noisy benchmark and its truth) and `lipkit data dedup` (exact, near and
caption duplicates), on the emoji fixture table; the numerical pieces against naive references."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_eval_setup
from lipkit.curate.dedup import (
    Found,
    candidate_pairs,
    caption_key,
    near_pass,
    pixel_distance,
    run_dedup,
)
from lipkit.data.builtin.noisy import build_noisy, caption_signature, derangement
from lipkit.data.images import load_image
from lipkit.errors import UserError


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def noisy(table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noisy") / "noisy"
    build_noisy(table, out, mispaired=0.3, duplicates=0.2, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(table, tmp_path_factory) -> Path:
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = tiny_eval_setup(table)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model, tok)


# -- the noisy benchmark ------------------------------------------------------------------------------


def test_noisy_table_holds_the_noise_its_truth_names(table, noisy):
    source = {r["image"]: r for r in lines(table)}  # the fixture table has no key column: keys are paths
    by_path = {str(Path(table).parent / img): r for img, r in source.items()}
    rows, truth = lines(noisy / "train.jsonl"), {t["key"]: t for t in lines(noisy / "truth.jsonl")}
    n = len(source)
    summary = json.loads((noisy / "summary.json").read_text())
    assert len(rows) == len(truth) == n + round(0.2 * n) == summary["rows"]
    assert {k for r in rows for k in r} <= {"key", "image", "captions", "langs"}  # no truth, no labels
    assert len({r["key"] for r in rows}) == len(rows)
    originals = [t for t in truth.values() if t["duplicate_of"] is None]
    assert sum(t["mispaired"] for t in originals) == round(0.3 * n)
    given = Counter()
    for r in rows:
        t = truth[r["key"]]
        own = by_path[t["source_key"]]
        if t["mispaired"]:  # another row's captions, all of them, never a set equal to its own
            assert caption_signature(r["captions"]) != caption_signature(own["captions"])
            if t["duplicate_of"] is None:
                given[tuple(r["captions"])] += 1
        else:
            assert r["captions"] == own["captions"] and r["langs"] == own["langs"]
    # the mispaired rows' captions are those same rows' captions, handed round (a derangement)
    taken = Counter(tuple(by_path[t["source_key"]]["captions"]) for t in originals if t["mispaired"])
    assert given == taken
    copies = [t for t in truth.values() if t["duplicate_of"] is not None]
    assert len(copies) == round(0.2 * n) and sum(t["reencoded"] for t in copies) == len(copies) // 2
    image = {r["key"]: noisy / r["image"] for r in rows}
    for t in copies:
        original = truth[t["duplicate_of"]]
        assert original["duplicate_of"] is None and original["source_key"] == t["source_key"]
        assert t["mispaired"] == original["mispaired"]
        copy, first = image[t["key"]].read_bytes(), image[t["duplicate_of"]].read_bytes()
        assert (copy[:3] == b"\xff\xd8\xff") == t["reencoded"]  # JPEG, or the same bytes
        assert t["reencoded"] or copy == first


def test_noisy_build_is_deterministic_for_a_seed_and_reused(table, noisy, tmp_path):
    again = tmp_path / "again"
    build_noisy(table, again, mispaired=0.3, duplicates=0.2, seed=1, progress=False)
    for name in ("train.jsonl", "truth.jsonl"):
        assert (again / name).read_bytes() == (noisy / name).read_bytes()
    stamp = (again / "summary.json").stat().st_mtime_ns
    build_noisy(table, again, mispaired=0.3, duplicates=0.2, seed=1, progress=False)  # same options: reused
    assert (again / "summary.json").stat().st_mtime_ns == stamp
    build_noisy(table, again, mispaired=0.3, duplicates=0.2, seed=2, progress=False)
    assert (again / "truth.jsonl").read_bytes() != (noisy / "truth.jsonl").read_bytes()


def test_noisy_build_refuses_what_it_must_not_touch(table, tmp_path):
    with pytest.raises(UserError, match="holds the source"):
        build_noisy(table, Path(table).parent, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a noisy build"):
        build_noisy(table, tmp_path / "mine", progress=False)
    with pytest.raises(UserError, match="--mispaired"):
        build_noisy(table, tmp_path / "x", mispaired=1.5, progress=False)


def test_derangement_avoids_equal_caption_sets():
    rng = random.Random(0)
    signatures = [i // 2 for i in range(40)]  # every caption set twice, as two artists' rows of a concept
    for seed in range(20):
        chosen = sorted(random.Random(seed).sample(range(40), 12))
        donor = derangement(chosen, signatures, rng)
        assert sorted(donor) == chosen and sorted(donor.values()) == chosen
        assert all(d != r and signatures[d] != signatures[r] for r, d in donor.items())
    with pytest.raises(UserError, match="lower --mispaired"):
        derangement([0, 1], [5, 5], rng)


# -- the numerical pieces against naive references ------------------------------------------------


def naive_pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    m = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
    h, w, _ = a.shape
    d = [[[sum(m[k][c] * (float(a[y, x, c]) - float(b[y, x, c])) for c in range(3)) for x in range(w)] for y in range(h)] for k in range(3)]  # fmt: skip

    def means(ch: int, s: int) -> list[list[float]]:
        return [[sum(d[ch][y + i][x + j] for i in range(s) for j in range(s)) / (s * s) for x in range(w - s + 1)] for y in range(h - s + 1)]  # fmt: skip

    luma = sorted(abs(v) for row in means(0, 2) for v in row)
    cb, cr = means(1, 4), means(2, 4)
    chroma = sorted(float(np.hypot(cb[y][x], cr[y][x])) for y in range(len(cb)) for x in range(len(cb[0])))
    return max(luma[-3], chroma[-3])


def test_pixel_distance_matches_a_loop():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    got = pixel_distance(a, b)
    want = [naive_pixel_distance(a[i], b[i]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert pixel_distance(a[0], a[0]) == 0.0


def test_candidate_pairs_match_brute_force_similarity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x[30:40] = x[:10] + 0.05 * rng.normal(size=(10, 8)).astype(np.float32)  # near copies
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    for k, floor in ((3, -1.0), (5, 0.2), (0, 0.5), (0, 0.9)):
        want = {}
        for i in range(60):
            others = [j for j in np.argsort(-sim[i], kind="stable") if j != i]
            for j in others if k == 0 else others[:k]:
                if sim[i, j] >= floor:
                    want[(min(i, j), max(i, j))] = sim[i, j]
        pairs, sims = candidate_pairs(x, k, floor)
        assert {tuple(p) for p in pairs.tolist()} == set(want)
        assert list(map(tuple, pairs.tolist())) == sorted(want, key=lambda p: (p[1], p[0]))
        np.testing.assert_allclose(sims, [want[tuple(p)] for p in pairs.tolist()], atol=1e-5)
    for n in (0, 1):  # nothing to pair
        assert candidate_pairs(x[:n], 3, 0.0)[0].shape == (0, 2)


def test_near_pass_matches_a_greedy_loop():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    thumbs = np.concatenate([base, np.clip(base[[0, 0, 3, 5]].astype(int) + rng.integers(-3, 4, (4, 32, 32, 3)), 0, 255).astype(np.uint8)])  # fmt: skip
    n = len(thumbs)
    records = [type("R", (), {"key": f"k{i}"})() for i in range(n)]
    found = Found(records)  # type: ignore[arg-type]
    pairs = np.array([(i, j) for j in range(n) for i in range(j)])
    near_pass(pairs, np.ones(len(pairs)), thumbs, found, 11.0, progress=False)
    kept, want = [], {}
    for j in range(n):  # the reference: each row against every row kept before it
        hits = [i for i in kept if naive_pixel_distance(thumbs[i], thumbs[j]) <= 11.0]
        if hits:
            want[j] = hits[0]
        else:
            kept.append(j)
    assert found.keeper == want == {8: 0, 9: 0, 10: 3, 11: 5}


# -- dedup end to end -----------------------------------------------------------------------------


def test_dedup_finds_the_copies_and_keeps_look_alikes(noisy, checkpoint, tmp_path):
    out = tmp_path / "dedup"
    s = run_dedup(noisy / "train.jsonl", out, checkpoint=checkpoint, neighbours=0, min_similarity=0.5, progress=False)  # fmt: skip
    truth = {t["key"]: t for t in lines(noisy / "truth.jsonl")}
    report = json.loads((out / "dedup_report.json").read_text())
    dropped = {d["key"]: d for d in report["dropped_rows"]}
    copies = {k for k, t in truth.items() if t["duplicate_of"]}
    pair_lost = [k for k in copies if k in dropped or truth[k]["duplicate_of"] in dropped]
    assert len(pair_lost) == len(copies)  # every copy found (one of each pair dropped)
    for d in dropped.values():
        t, other = truth[d["key"]], truth[d["duplicate_of"]]
        if t["source_key"] != other["source_key"]:  # the fixture draws one image twice (same pixels)
            assert d["reason"] == "exact"
            continue
        reencoded = t["reencoded"] or other["reencoded"]
        assert d["reason"] == ("near" if reencoded else "exact")
        assert (d["pixel_distance"] <= 11.0) if reencoded else "similarity" not in d
    assert sum(d["reason"] == "near" for d in dropped.values()) == sum(truth[k]["reencoded"] for k in copies)
    kept = lines(out / "train.jsonl")
    assert s["kept"] == len(kept) == len(truth) - len(dropped)
    assert {r["key"] for r in kept} == set(truth) - set(dropped)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in kept)
    assert (out / "embeddings" / "manifest.json").is_file()


def test_skin_tone_variants_are_far_apart_in_pixels(table):
    rows = lines(table)
    by_concept: dict[str, list[np.ndarray]] = {}
    for r in rows:
        if r["style"] == "google":
            img = load_image(Path(table).parent / r["image"], 32).permute(1, 2, 0).numpy()
            by_concept.setdefault(r["concept"], []).append(img)
    variants = [v for v in by_concept.values() if len(v) > 1]
    assert variants
    for v in variants:
        d = pixel_distance(np.stack(v)[:, None], np.stack(v)[None])
        assert (d[~np.eye(len(v), dtype=bool)] > 11.0).all()


def test_dedup_by_captions_and_exact_without_a_checkpoint(table, tmp_path):
    from PIL import Image

    from lipkit.data.images import to_rgb

    rows = lines(table)
    seen: dict[bytes, int] = {}
    exact = set()
    for i, r in enumerate(rows):  # the reference: the same RGB pixels as an earlier row
        with Image.open(Path(table).parent / r["image"]) as im:
            px = to_rgb(im)
            if seen.setdefault(px.tobytes() + bytes(str(px.size), "ascii"), i) != i:
                exact.add(i)
    s = run_dedup(table, tmp_path / "a", progress=False)
    assert s["dropped"] == {"exact": len(exact), "near": 0, "caption": 0} and s["near_search"] is None
    s = run_dedup(table, tmp_path / "b", captions=True, progress=False)
    first: dict[frozenset, str] = {}
    for i, r in enumerate(rows):
        if i not in exact:
            first.setdefault(caption_key(r["captions"]), r["image"])
    assert s["kept"] == len(first) and s["dropped"]["caption"] == len(rows) - len(exact) - len(first)
    kept = [Path(r["image"]).relative_to(Path(table).parent.resolve()).as_posix() for r in lines(tmp_path / "b" / "train.jsonl")]  # fmt: skip
    assert kept == list(first.values())


def test_dedup_user_errors(table, checkpoint, tmp_path):
    with pytest.raises(UserError, match="--embeddings needs --checkpoint"):
        run_dedup(table, tmp_path / "o", embeddings=tmp_path / "e", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="did not write"):
        run_dedup(table, tmp_path / "busy", progress=False)
    with pytest.raises(UserError, match="--neighbours"):
        run_dedup(table, tmp_path / "o", checkpoint=checkpoint, neighbours=-1, progress=False)


def test_command_line(table, tmp_path):
    from typer.testing import CliRunner

    from lipkit.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["data", "build", "noisy", "--source", str(table), "--out", str(tmp_path / "n"), "--duplicates", "0.5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "dedup", str(tmp_path / "n" / "train.jsonl"), str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d" / "dedup_report.json").read_text())
    truth = lines(tmp_path / "n" / "truth.jsonl")
    dropped = {d["key"] for d in report["dropped_rows"]}
    byte_copies = [t for t in truth if t["duplicate_of"] is not None and not t["reencoded"]]
    assert byte_copies and all(t["key"] in dropped or t["duplicate_of"] in dropped for t in byte_copies)
    assert report["dropped"]["near"] == 0 and report["near_search"] is None
