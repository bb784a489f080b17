"""`lipkit data cluster | reduce | associate` (lipkit.curate.cluster, reduce, associate): k-means assignment
against a brute-force nearest centroid, reduce's selection against a naive per-cluster sort, associate's
top-K against brute force, end to end on the fixture dataset with a tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import tiny_eval_setup
from lipkit.curate.associate import balanced_rows, pool_texts, retrieve, run_associate
from lipkit.curate.cluster import assign, load_clusters, run_cluster, spherical_kmeans
from lipkit.curate.reduce import quotas, run_reduce, select
from lipkit.errors import UserError
from lipkit.search.collection import collect


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(table, tmp_path_factory) -> Path:
    from lipkit.checkpoint import save_checkpoint

    _, tok, model = tiny_eval_setup(table, n=40)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model, tok)


@pytest.fixture(scope="module")
def clustered(ckpt, table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clusters") / "c"
    run_cluster(ckpt, table, out, 6, seed=1, progress=False)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- cluster -------------------------------------------------------------------------------------------


def test_assignment_is_the_brute_force_nearest_centroid():
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(300, 16)))
    c = spherical_kmeans(x, 7, seed=3)
    labels, dists = assign(x, c)
    for i in range(len(x)):  # the nearest centroid by Euclidean distance, one sample at a time
        d2 = [float(((x[i] - c[j]) ** 2).sum()) for j in range(len(c))]
        assert labels[i] == int(np.argmin(d2))
        assert dists[i] == pytest.approx(1.0 - float(x[i] @ c[labels[i]]), abs=1e-5)
        assert dists[i] == pytest.approx(min(d2) / 2, abs=1e-5)  # ‖x − c‖² = 2 − 2 x·c for unit vectors
    assert np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    nearest, _ = assign(x, c, nearest=3)  # MLCD's labels: the 3 nearest, nearest first
    for i in range(len(x)):
        cos = [float(x[i] @ c[j]) for j in range(len(c))]
        assert nearest[i].tolist() == sorted(range(len(c)), key=lambda j: -cos[j])[:3]
    assert np.array_equal(spherical_kmeans(x, 7, seed=3), c)  # seeded


def test_labels_list_each_samples_nearest_clusters(ckpt, table, clustered, tmp_path):
    out = tmp_path / "multi"
    run_cluster(ckpt, table, out, 6, seed=1, labels_per_sample=3, embeddings=clustered / "embeddings")
    rows, single = read_jsonl(out / "clusters.jsonl"), read_jsonl(clustered / "clusters.jsonl")
    assert [r["cluster"] for r in rows] == [r["cluster"] for r in single]  # the same clustering
    assert all(len(set(r["labels"])) == 3 and r["labels"][0] == r["cluster"] for r in rows)
    assert (
        "labels" not in single[0] and json.loads((out / "cluster.json").read_text())["labels_per_sample"] == 3
    )
    with pytest.raises(UserError, match="--labels must be between 1 and --k"):
        run_cluster(
            ckpt, table, tmp_path / "bad", 6, labels_per_sample=7, embeddings=clustered / "embeddings"
        )


def test_kmeans_finds_separated_directions():
    rng = np.random.default_rng(1)
    centers = unit(rng.normal(size=(4, 32)))
    truth = np.repeat(np.arange(4), 50)
    x = unit(centers[truth] + 0.05 * rng.normal(size=(200, 32)))
    labels, _ = assign(x, spherical_kmeans(x, 4, seed=0))
    for t in range(4):  # each true group lands in one cluster of its own
        assert len(set(labels[truth == t].tolist())) == 1
    assert len(set(labels.tolist())) == 4


def test_cluster_end_to_end(clustered, table):
    summary = json.loads((clustered / "cluster.json").read_text())
    rows = read_jsonl(clustered / "clusters.jsonl")
    x = np.load(clustered / "embeddings" / "image_emb.npy")
    ids = json.loads((clustered / "embeddings" / "ids.json").read_text())
    c = np.load(clustered / "centroids.npy")
    assert summary["k"] == 6 and len(summary["sizes"]) == 6 and sum(summary["sizes"]) == len(rows) == len(x)
    assert [r["key"] for r in rows] == [item["key"] for item in ids]
    brute = [int(np.argmax([float(x[i] @ c[j]) for j in range(6)])) for i in range(len(x))]
    assert [r["cluster"] for r in rows] == brute
    assert summary["sizes"] == np.bincount(brute, minlength=6).tolist()
    inertia = sum(float(((x[i] - c[brute[i]]) ** 2).sum()) for i in range(len(x)))
    assert summary["inertia"] == pytest.approx(inertia, rel=1e-4)
    loaded = load_clusters(clustered)
    assert loaded[rows[0]["key"]] == (rows[0]["cluster"], rows[0]["distance"])


def test_cluster_rerun_reuses_embeddings_and_is_seeded(clustered, ckpt, table, tmp_path):
    out = tmp_path / "again"
    run_cluster(ckpt, table, out, 6, seed=1, embeddings=clustered / "embeddings")
    assert not (out / "embeddings").exists()  # the given folder was read, not recomputed
    assert (out / "clusters.jsonl").read_text() == (clustered / "clusters.jsonl").read_text()


def test_cluster_refuses_bad_input(clustered, ckpt, table, tmp_path):
    with pytest.raises(UserError, match="--k must be between 1"):
        run_cluster(ckpt, table, tmp_path / "big", 10_000, embeddings=clustered / "embeddings")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        run_cluster(ckpt, table, tmp_path / "foreign", 3)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(table.read_text().splitlines()[:5]) + "\n")
    (tmp_path / "images").symlink_to(table.parent / "images")
    with pytest.raises(UserError, match="another source or checkpoint"):
        run_cluster(ckpt, other, tmp_path / "o", 2, embeddings=clustered / "embeddings")
    with pytest.raises(UserError, match="not a finished clustering"):
        load_clusters(tmp_path / "foreign")
    int8 = tmp_path / "int8-embeddings"  # the same folder, as `lipkit embed --int8` would mark it
    shutil.copytree(clustered / "embeddings", int8)
    manifest = json.loads((int8 / "manifest.json").read_text())
    manifest["fingerprint"]["onnx"] = "model_sha256 of an int8 export"
    (int8 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="int8 ONNX towers"):
        run_cluster(ckpt, table, tmp_path / "q", 2, embeddings=int8)
    rows = [json.loads(x) for x in table.read_text().splitlines()[:4]]
    for i, r in enumerate(rows):  # two different images under one key, as shards restarting __key__ give
        r["image"], r["key"] = str((table.parent / r["image"]).resolve()), f"k{i % 3}"
    clash = tmp_path / "clash.jsonl"
    clash.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="share the key 'k0'"):
        run_cluster(ckpt, clash, tmp_path / "clash", 2)
    # a mistyped checkpoint beside a finished embeddings folder: one sentence, no traceback
    with pytest.raises(UserError, match="is not a lipkit checkpoint"):
        run_cluster(tmp_path / "chekpoint", table, tmp_path / "m", 2, embeddings=clustered / "embeddings")


# -- reduce --------------------------------------------------------------------------------------------


def naive_selection(clusters: np.ndarray, scores: np.ndarray, ratio: float) -> list[int]:
    """Per cluster: sort its members by (score, row) and keep the first quota of them."""
    m = quotas(np.bincount(clusters), ratio)
    kept = []
    for c in sorted(set(clusters.tolist())):
        members = sorted((float(scores[i]), i) for i in range(len(clusters)) if clusters[i] == c)
        kept += [i for _, i in members[: m[c]]]
    return sorted(kept)


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5, 0.9, 1.0])
def test_selection_matches_a_naive_per_cluster_sort(ratio):
    rng = np.random.default_rng(int(ratio * 100))
    clusters = rng.integers(0, 9, size=400)
    clusters[clusters == 4] = 5  # an empty cluster in the middle
    scores = np.round(rng.random(400), 2)  # ties, broken by row order
    assert select(clusters, scores, ratio).tolist() == naive_selection(clusters, scores, ratio)


def test_quotas():
    sizes = np.array([100, 50, 7, 1, 0, 2])
    m = quotas(sizes, 0.1)
    assert m.tolist() == [10, 5, 1, 1, 0, 1]  # R·n by largest remainders, at least one per non-empty cluster
    assert quotas(sizes, 1.0).tolist() == sizes.tolist()
    big = np.array([33, 33, 34])
    assert quotas(big, 0.5).sum() == 50  # Σ = round(R·N) when no cluster needs its minimum of one


def test_reduce_end_to_end(clustered, table, tmp_path):
    before = hashlib.sha256(table.read_bytes()).hexdigest()
    s = run_reduce(table, clustered, tmp_path / "r", 0.3)
    rows = read_jsonl(tmp_path / "r" / "reduced.jsonl")
    source = read_jsonl(table)
    clusters = load_clusters(clustered)
    keys = [str(table.parent / r["image"]) for r in source]
    c = np.array([clusters[k][0] for k in keys])
    d = np.array([clusters[k][1] for k in keys])
    expected = naive_selection(c, d, 0.3)
    assert [r["key"] for r in rows] == [keys[i] for i in expected]
    assert s["kept"] == len(rows) and sum(s["kept_per_cluster"]) == len(rows)
    assert set(rows[0]) >= set(source[0]) and Path(rows[0]["image"]).is_absolute()
    assert hashlib.sha256(table.read_bytes()).hexdigest() == before
    assert json.loads((tmp_path / "r" / "reduce.json").read_text())["ratio"] == 0.3
    with pytest.raises(UserError, match="--ratio"):
        run_reduce(table, clustered, tmp_path / "r2", 1.5)
    with pytest.raises(UserError, match="an input"):
        run_reduce(table, clustered, clustered, 0.5)


# -- associate -----------------------------------------------------------------------------------------


def test_retrieve_matches_brute_force():
    rng = np.random.default_rng(2)
    images, texts = unit(rng.normal(size=(50, 12))), unit(rng.normal(size=(80, 12)))
    exclude = [set(rng.choice(80, size=int(rng.integers(0, 4)), replace=False).tolist()) for _ in range(50)]
    hits, sims = retrieve(images, texts, 5, exclude)
    for i in range(50):
        sim = [(float(images[i] @ texts[j]), j) for j in range(80) if j not in exclude[i]]
        best = sorted(sim, reverse=True)[:5]
        assert hits[i] == [j for _, j in best]
        assert sims[i] == pytest.approx([v for v, _ in best], abs=1e-5)
    sub, _ = retrieve(images, texts, 3, None, rows=[7, 3])  # a subset of rows, in the order given
    full, _ = retrieve(images, texts, 3)
    assert sub == [full[7], full[3]]


def test_pool_texts_and_balanced_rows():
    from lipkit.data.records import Record

    recs = [Record(Path("a"), ["x", "y"]), Record(Path("b"), ["y", "z"])]
    rows = [r.captions for r in recs]
    assert pool_texts(rows) == ["x", "y", "z"] and pool_texts(rows, "first") == ["x", "y"]
    found = [(0, 0.1)] * 5 + [(1, 0.2)] * 2 + [None]
    keep, cap = balanced_rows(found, 2, seed=0)
    assert cap == 2 and len(keep) == 5 and sum(k < 5 for k in keep) == 2 and {5, 6, 7} <= set(keep.tolist())


def brute_force_texts(ckpt: Path, texts: list[str]) -> np.ndarray:
    from lipkit.checkpoint import load_checkpoint
    from lipkit.search.encode import encode_texts

    model, tok, _ = load_checkpoint(ckpt)
    return unit(np.concatenate([encode_texts(model, tok, [t]) for t in texts]))


def test_associate_end_to_end(clustered, ckpt, table, tmp_path):
    out = tmp_path / "a"
    emb = clustered / "embeddings"
    s = run_associate(ckpt, table, out, 3, table, pool_captions="first", exclude_own=True, embeddings=emb)
    rows = read_jsonl(out / "associated.jsonl")
    texts = pool_texts([r.captions for r in collect(table)], "first")
    t = brute_force_texts(ckpt, texts)
    x = np.load(clustered / "embeddings" / "image_emb.npy")
    assert len(rows) == len(x) == s["written"] and s["own_caption_retrieved"] == 0.0
    for i, row in enumerate(rows):
        candidates = [j for j in range(len(texts)) if texts[j] not in row["captions"]]
        sims = sorted(((float(x[i] @ t[j]), texts[j]) for j in candidates), reverse=True)
        assert row["captions_retrieved"] == [c for _, c in sims[:3]]
        assert row["captions_retrieved_scores"] == pytest.approx([v for v, _ in sims[:3]], abs=1e-4)
        assert not set(row["captions_retrieved"]) & set(row["captions"])


def test_associate_balanced_keeps_at_most_n_per_cluster(clustered, ckpt, table, tmp_path):
    emb = clustered / "embeddings"
    s = run_associate(
        ckpt, table, tmp_path / "b", 2, table, balanced=clustered, per_cluster=1, embeddings=emb
    )
    rows = read_jsonl(tmp_path / "b" / "associated.jsonl")
    clusters = load_clusters(clustered)
    got = [clusters[r["key"]][0] for r in rows]
    sizes = json.loads((clustered / "cluster.json").read_text())["sizes"]
    assert sorted(got) == [c for c, n in enumerate(sizes) if n]  # one image from every non-empty cluster
    assert s["per_cluster"] == 1 and s["own_caption_retrieved"] is not None


def test_cli_commands(clustered, ckpt, table, tmp_path):
    from lipkit.cli import app

    runner = CliRunner()
    emb = str(clustered / "embeddings")
    r = runner.invoke(
        app, ["data", "cluster", str(ckpt), str(table), str(tmp_path / "c"), "--k", "3", "--embeddings", emb]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["data", "reduce", str(table), str(tmp_path / "c"), str(tmp_path / "r"), "--ratio", "0.5"]
    )
    assert r.exit_code == 0, r.output
    reduced = str(tmp_path / "r" / "reduced.jsonl")
    args = ["data", "associate", str(ckpt), reduced, str(tmp_path / "a"), "-k", "2", "--pool", str(table)]
    r = runner.invoke(app, [*args, "--exclude-own"])
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(tmp_path / "a" / "associated.jsonl")) == len(
        read_jsonl(tmp_path / "r" / "reduced.jsonl")
    )


def test_a_text_pool_needs_no_images(tmp_path):
    """A .txt file (one text per line) and a table with captions but no image column are pools."""
    from lipkit.curate.associate import pool_rows

    (tmp_path / "pool.txt").write_text("a red heart\n\n a cat face \na red heart\n")
    assert pool_texts(pool_rows(tmp_path / "pool.txt", "image", "captions")) == ["a red heart", "a cat face"]
    (tmp_path / "pool.jsonl").write_text('{"captions": ["x", "y"]}\n{"text": "z"}\n')
    assert pool_texts(pool_rows(tmp_path / "pool.jsonl", "image", "captions")) == ["x", "y", "z"]
    (tmp_path / "pool.tsv").write_text("caption\tother\nhello\t1\n")
    assert pool_rows(tmp_path / "pool.tsv", "image", "caption") == [["hello"]]
