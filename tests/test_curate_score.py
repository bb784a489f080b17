"""`lipkit data score | filter`: scores against a naive loop (one image, one caption at a time), the AUC
against a brute-force pair count, the filter rules against a naive per-group sort, resume without
rescoring, shards in → shards out, `lipkit embed` reuse, the inspect histogram and the CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import tiny_eval_setup
from lipkit.curate.filter import keep_count, keep_mask, run_filter
from lipkit.curate.reduce import quotas
from lipkit.curate.score import run_score, score_source
from lipkit.curate.score_chunks import embeddings_lookup
from lipkit.curate.separation import auc
from lipkit.data.sources.registry import read_table, scan
from lipkit.errors import UserError
from lipkit.search.collection import checkpoint_fingerprint
from lipkit.search.encode import Towers

N = 14  # rows of the fixture table scored in these tests


@pytest.fixture(scope="module")
def ckpt(table, tmp_path_factory):
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = tiny_eval_setup(table, n=40)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model, tok)


@pytest.fixture(scope="module")
def small(table, tmp_path_factory) -> Path:
    """The first N rows of the fixture table, in another folder (image paths made absolute, a key each),
    one row with a missing image; truth.jsonl beside it marks every third row mispaired."""
    rows = [json.loads(x) for x in table.read_text().splitlines()[:N]]
    for i, r in enumerate(rows):
        r["image"] = str((table.parent / r["image"]).resolve())
        r["key"] = f"k{i:02d}"
    rows[5]["image"] = str(table.parent / "images" / "nowhere.png")
    path = tmp_path_factory.mktemp("small") / "pairs.jsonl"
    truth = [{"key": r["key"], "mispaired": i % 3 == 0} for i, r in enumerate(rows)]
    (path.parent / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def scored(ckpt, small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "out"
    run_score(
        ckpt, small, out, batch_size=5, chunk_size=4, truth=small.parent / "truth.jsonl", progress=False
    )
    return out


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def all_scores(out: Path) -> list[float]:
    """Every caption's score of a scored table, in order (with the row's key, so that rows align)."""
    return [x for row in rows_of(out / "scored.jsonl") for x in row["clip_scores"]]


def digest(path: Path) -> str:
    files = sorted(p for p in path.parent.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_auc_is_the_brute_force_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        s = rng.integers(0, 6, n).astype(float)  # many ties
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        pos, neg = s[y], s[~y]
        wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
        assert auc(s, y) == pytest.approx(wins / (len(pos) * len(neg)))
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.7, 1.0])
def test_keep_mask_is_a_naive_per_group_sort(fraction):
    rng = np.random.default_rng(1)
    s = rng.integers(0, 10, 200) / 10  # ties
    groups = rng.integers(-1, 7, 200)
    keep = keep_mask(s, keep_fraction=fraction, groups=groups)
    labels = sorted(set(groups.tolist()))
    counts = quotas(np.array([int((groups == g).sum()) for g in labels]), fraction)  # as reduce keeps
    assert int(keep.sum()) == int(counts.sum()) == int(np.floor(fraction * 200 + 0.5))
    for g, count in zip(labels, counts, strict=True):
        rows = [i for i in range(200) if groups[i] == g]
        best = sorted(rows, key=lambda i: (-s[i], i))[:count]
        assert sorted(np.flatnonzero(keep & (groups == g)).tolist()) == sorted(best)
    whole = keep_mask(s, keep_fraction=fraction)
    assert whole.sum() == keep_count(fraction, 200) and s[whole].min() >= s[~whole].max(initial=-1)
    assert (keep_mask(s, min_score=0.5) == (s >= 0.5)).all()
    assert keep_count(0.01, 3) == 1 and keep_count(0.5, 3) == 2 and keep_count(1.0, 3) == 3


def test_scores_match_a_naive_loop(ckpt, small, scored):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.data.images import try_load_image

    model, tok, _ = load_checkpoint(ckpt)
    out = rows_of(scored / "scored.jsonl")
    source = {r["image"]: r for r in rows_of(small)}
    assert len(out) == N - 1  # the missing image is left out, and listed
    skipped = json.loads((scored / "skipped.json").read_text())
    assert [s["reason"] for s in skipped] == ["file not found"] and skipped[0]["key"] == "k05"
    with torch.no_grad():
        for row in out:
            assert set(source[row["image"]]) | {"key", "clip_score", "clip_scores"} == set(row)
            assert Path(row["image"]).is_absolute() and Path(row["image"]).is_file()
            x, _, _ = try_load_image(row["image"], model.spec.image_size)
            img = model.embed_images_u8(x[None])[0]
            naive = []
            for caption in row["captions"]:
                txt = model.encode_text(tok([caption]))[0]
                naive.append(sum(float(a) * float(b) for a, b in zip(img, txt, strict=True)))
            assert row["clip_scores"] == pytest.approx(naive, abs=1e-5)
            assert row["clip_score"] == max(row["clip_scores"])
    manifest = json.loads((scored / "score.json").read_text())
    assert manifest["complete"] and manifest["scored"] == N - 1 and not (scored / "chunks").exists()
    truth = [int(r["key"][1:]) % 3 != 0 for r in out]
    assert manifest["truth"]["auc"] == pytest.approx(auc([r["clip_score"] for r in out], truth), abs=1e-4)
    assert manifest["truth"]["pairs"] == N - 1 and manifest["truth"]["mispaired"] == 5
    # the scored table trains as it is: same pairs, same keys, from any working directory
    assert [r.key for r in read_table(scored / "scored.jsonl")] == [r["key"] for r in out]


def test_score_resumes_without_rescoring(ckpt, small, scored, tmp_path):
    from lipkit.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(ckpt)
    towers = Towers.of_model(model, tok)
    real, calls = towers.images, []

    def dying(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third chunk is scored
        return real(x)

    towers.images = dying
    kw = dict(fingerprint={"checkpoint": "tiny"}, batch_size=4, chunk_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        score_source(towers, small, tmp_path / "s", **kw)
    assert sorted(p.name for p in (tmp_path / "s" / "chunks").iterdir()) == ["00000.npz", "00001.npz"]
    assert not (tmp_path / "s" / "scored.jsonl").exists()  # no half-written output
    with pytest.raises(UserError, match="incomplete"):
        run_filter(tmp_path / "s", tmp_path / "f", keep_fraction=0.5, progress=False)
    calls.clear()
    towers.images = lambda x: (calls.append(len(x)), real(x))[1]
    r = score_source(towers, small, tmp_path / "s", **kw)
    assert (r.chunks_done_before, r.chunks_computed) == (2, 2) and sum(calls) == N - 8
    assert all_scores(tmp_path / "s") == pytest.approx(all_scores(scored), abs=1e-5)
    calls.clear()
    assert score_source(towers, small, tmp_path / "s", **kw).chunks_computed == 0 and not calls
    with pytest.raises(UserError, match="another source"):
        score_source(towers, small, tmp_path / "s", **{**kw, "chunk_size": 5})


def test_shards_in_shards_out_streamed(ckpt, small, scored, tmp_path, monkeypatch):
    import lipkit.curate.score as score_module
    from lipkit.data.convert import convert

    convert(small, tmp_path / "shards", shard_size=5, progress=False)
    sizes, real = [], score_module.score_chunk
    monkeypatch.setattr(
        score_module, "score_chunk", lambda t, recs, **kw: (sizes.append(len(recs)), real(t, recs, **kw))[1]
    )
    r = run_score(ckpt, tmp_path / "shards", tmp_path / "out", chunk_size=4, progress=False)
    assert r.output == "shards" and max(sizes) == 4  # one chunk of images in memory at a time
    got = {x.key: x.meta for x in scan(tmp_path / "out" / "shards") if not hasattr(x, "reason")}
    table = {row["key"]: row for row in rows_of(scored / "scored.jsonl")}
    assert set(got) == set(table)
    for key, meta in got.items():
        assert meta["clip_scores"] == pytest.approx(table[key]["clip_scores"], abs=1e-5)
        assert meta["category"] == table[key]["category"]
    # filtered shards stay shards, and the input shards are untouched
    before = digest(tmp_path / "out" / "shards" / "00000.tar")
    s = run_filter(tmp_path / "out", tmp_path / "kept", keep_fraction=0.5, progress=False)
    assert s["output"] == "shards" and s["kept"] == keep_count(0.5, N - 1)
    kept = [x for x in scan(tmp_path / "kept" / "shards") if not hasattr(x, "reason")]
    assert len(kept) == s["kept"] and digest(tmp_path / "out" / "shards" / "00000.tar") == before


def test_parquet_with_image_bytes_gives_shards(ckpt, small, scored, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for r in rows_of(small) if Path(r["image"]).is_file()]
    data = {
        "image": [Path(r["image"]).read_bytes() for r in rows],
        "captions": [r["captions"] for r in rows],
        "key": [r["key"] for r in rows],
    }
    pq.write_table(pa.table(data), tmp_path / "pairs.parquet")
    r = run_score(ckpt, tmp_path / "pairs.parquet", tmp_path / "out", chunk_size=5, progress=False)
    assert r.output == "shards" and r.scored == len(rows)
    got = {
        x.key: x.meta["clip_scores"] for x in scan(tmp_path / "out" / "shards") if not hasattr(x, "reason")
    }
    table = {row["key"]: row["clip_scores"] for row in rows_of(scored / "scored.jsonl")}
    assert set(got) == set(table) and all(got[k] == pytest.approx(table[k], abs=1e-5) for k in got)


def test_embeddings_of_lipkit_embed_are_reused(ckpt, small, scored, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.search.embed import run_embed

    run_embed(ckpt, small, tmp_path / "emb", progress=False)
    model, tok, _ = load_checkpoint(ckpt)
    towers = Towers.of_model(model, tok)
    towers.images = lambda x: pytest.fail("the image tower ran although the embeddings were there")
    lookup = embeddings_lookup(tmp_path / "emb", checkpoint_fingerprint(ckpt), str(small))
    score_source(towers, small, tmp_path / "s", fingerprint={}, lookup=lookup, chunk_size=4, progress=False)
    assert all_scores(tmp_path / "s") == pytest.approx(all_scores(scored), abs=1e-5)
    with pytest.raises(UserError, match="another checkpoint"):
        embeddings_lookup(tmp_path / "emb", "0" * 32, str(small))


def test_filter_rules_and_clusters(scored, tmp_path):
    rows = rows_of(scored / "scored.jsonl")
    s = np.asarray([r["clip_score"] for r in rows])
    before = digest(scored / "scored.jsonl")
    t = run_filter(scored, tmp_path / "thr", min_score=float(np.median(s)), progress=False)
    kept = rows_of(tmp_path / "thr" / "filtered.jsonl")
    assert [r["key"] for r in kept] == [r["key"] for r in rows if r["clip_score"] >= np.median(s)]
    assert t["kept"] + t["dropped"] == len(rows) and kept[0] == next(
        r for r in rows if r["key"] == kept[0]["key"]
    )
    dropped = rows_of(tmp_path / "thr" / "dropped.jsonl")
    assert [d["clip_score"] for d in dropped] == sorted(d["clip_score"] for d in dropped)
    # per cluster: a hand-written clustering (one cluster of a single low-scoring pair survives)
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    worst = int(np.argmin(s))
    labels = [0 if i == worst else 1 + i % 2 for i in range(len(rows))]
    lines = [
        json.dumps({"key": r["key"], "cluster": c, "distance": 0.1})
        for r, c in zip(rows, labels, strict=True)
    ]
    (clusters / "clusters.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last pair: no cluster
    (clusters / "cluster.json").write_text(json.dumps({"format": "lipkit-clusters", "k": 3}))
    p = run_filter(scored, tmp_path / "pc", keep_fraction=0.3, per_cluster=clusters, progress=False)
    kept = {r["key"] for r in rows_of(tmp_path / "pc" / "filtered.jsonl")}
    assert rows[worst]["key"] in kept and p["clusters"] == {"clusters": 3, "unclustered_pairs": 1}
    groups = np.asarray([-1 if i == len(rows) - 1 else c for i, c in enumerate(labels)])
    assert kept == {rows[i]["key"] for i in np.flatnonzero(keep_mask(s, keep_fraction=0.3, groups=groups))}
    assert digest(scored / "scored.jsonl") == before  # the input is never touched


def test_filter_refuses_bad_input(scored, small, tmp_path):
    with pytest.raises(UserError, match="exactly one rule"):
        run_filter(scored, tmp_path / "a", min_score=0.1, keep_fraction=0.5, progress=False)
    with pytest.raises(UserError, match="no clip_score"):
        run_filter(small, tmp_path / "b", keep_fraction=0.5, progress=False)
    with pytest.raises(UserError, match="is or holds an input"):
        run_filter(scored, scored, keep_fraction=0.5, progress=False)
    with pytest.raises(UserError, match="lower --min-score"):
        run_filter(scored, tmp_path / "c", min_score=2.0, progress=False)
    with pytest.raises(UserError, match="not a finished clustering"):
        run_filter(scored, tmp_path / "d", keep_fraction=0.5, per_cluster=tmp_path, progress=False)


def test_inspect_shows_the_score_histogram(scored):
    from lipkit.data.inspection import inspect

    report = inspect(scored / "scored.jsonl", progress=False).to_dict()
    cs = report["clip_score"]
    assert cs["n"] == N - 1 and sum(cs["histogram"].values()) == N - 1
    assert inspect(scored / "scored.jsonl", limit=1, progress=False).to_dict()["clip_score"]["n"] == 1


def test_cli_score_and_filter(ckpt, small, tmp_path):
    from lipkit.cli.curate_score import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a group, so that the command name is the first argument
    run = CliRunner().invoke
    r = run(
        app,
        [
            "score",
            str(ckpt),
            str(small),
            str(tmp_path / "s"),
            "--chunk-size",
            "8",
            "--truth",
            str(small.parent / "truth.jsonl"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "AUC" in r.output and "CLIP score of 13 pairs" in r.output
    r = run(app, ["filter", str(tmp_path / "s"), str(tmp_path / "f"), "--keep-fraction", "0.7"])
    assert r.exit_code == 0, r.output
    assert "dropped" in r.output and len(rows_of(tmp_path / "f" / "filtered.jsonl")) == keep_count(0.7, 13)
    r = run(app, ["score", str(ckpt), str(small), str(small.parent), "--chunk-size", "8"])
    assert isinstance(r.exception, UserError) and "outside it" in str(r.exception)
    r = run(app, ["filter", str(tmp_path / "s"), str(tmp_path / "g"), "--keep-fraction", "1.5"])
    assert isinstance(r.exception, UserError)


def test_a_bad_truth_file_is_an_error(ckpt, small, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"key": "k00", "mispaired": "yes"}) + "\n")
    with pytest.raises(UserError, match="must be true or false"):
        run_score(ckpt, small, tmp_path / "s", truth=tmp_path / "t.jsonl", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        run_score(ckpt, small, tmp_path / "s", truth=tmp_path / "none.jsonl", progress=False)


def test_truth_given_after_scoring_is_measured_on_the_written_scores(ckpt, small, scored, tmp_path):
    """Scored without --truth, then rerun with it: nothing is rescored and the AUC is the one a run with
    --truth from the start reported."""
    out = tmp_path / "later"
    run_score(ckpt, small, out, batch_size=5, chunk_size=4, progress=False)
    again = run_score(
        ckpt, small, out, batch_size=5, chunk_size=4, truth=small.parent / "truth.jsonl", progress=False
    )
    first = json.loads((scored / "score.json").read_text())["truth"]
    assert again.chunks_computed == 0 and again.truth == first


def test_a_changed_image_or_source_is_never_served_from_old_scores(ckpt, small, tmp_path):
    """A chunk is reused only for the same keys, captions and images: an image restored (rewritten) after
    an interrupted run is scored again; a finished output of a table that changed since is refused."""
    import shutil

    from lipkit.checkpoint import load_checkpoint

    src = tmp_path / "src"
    shutil.copytree(small.parent, src)
    rows = rows_of(src / "pairs.jsonl")
    first = tmp_path / "first.png"
    shutil.copy(rows[0]["image"], first)
    rows[0]["image"] = str(first)
    (src / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    model, tok, _ = load_checkpoint(ckpt)
    towers = Towers.of_model(model, tok)
    kw = dict(fingerprint={"checkpoint": "tiny"}, batch_size=4, chunk_size=4, progress=False)
    out = tmp_path / "s"
    real, calls = towers.images, []

    def dying(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(x)

    towers.images = dying
    with pytest.raises(KeyboardInterrupt):
        score_source(towers, src / "pairs.jsonl", out, **kw)
    shutil.copy(rows[1]["image"], first)  # the first row's image file is now another drawing
    towers.images = lambda x: (calls.append(len(x)), real(x))[1]
    r = score_source(towers, src / "pairs.jsonl", out, **kw)
    assert (r.chunks_done_before, r.chunks_computed) == (0, math.ceil(N / 4))  # chunk 0 scored again
    with (src / "pairs.jsonl").open("a") as f:  # the table changes after the run finished
        f.write(json.dumps({**rows[2], "key": "new-row"}) + "\n")
    with pytest.raises(UserError, match="source changed"):
        score_source(towers, src / "pairs.jsonl", out, **kw)
