"""Indexes against exact search, save/load, incremental add, the sparse index against a dense dot
product, and `lipkit embed` / `index` / `search` (resume included) on a tiny random-weight model.

The helpers at the top (`tiny_checkpoint`, `image_collection`, `search_cli`) are shared with the
server tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from lipkit.checkpoint import save_checkpoint
from lipkit.errors import UserError
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.text.tokenizer import TextTokenizer

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")

from lipkit.search.collection import collect  # noqa: E402
from lipkit.search.embed import embed_collection, run_embed  # noqa: E402
from lipkit.search.embeddings_dir import load_embeddings  # noqa: E402
from lipkit.search.index import DenseIndex, build_index, exact_topk, load_index, neighbour_overlap  # noqa: E402
from lipkit.search.sparse_index import SparseIndex, SparseMatrix, read_lexical  # noqa: E402

TINY = dict(
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    text_width=32,
    text_layers=1,
    text_heads=2,
    embed_dim=16,
    image_size=32,
    patch_size=8,
    context_length=16,
)
WORDS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "circle",
    "square",
    "star",
    "heart",
    "face",
    "cat",
    "dog",
    "moon",
    "sun",
    "tree",
    "car",
]


# ------------------------------------------------------------------------------------------------
# shared helpers


def tiny_checkpoint(path: Path, seed: int = 0, lexicon: bool = False) -> Path:
    """A random-weight dual encoder (16-d, 32 px) + a small BPE tokenizer, saved as a checkpoint
    (with LexLIP heads over the tokenizer's vocabulary when `lexicon`)."""
    tok = TextTokenizer.train([f"a {a} {b}" for a in WORDS for b in WORDS], vocab_size=300, context_length=16)
    torch.manual_seed(seed)
    lex = tok.vocab_size if lexicon else 0
    spec = get_spec("tiny", **TINY, vocab_size=tok.vocab_size, eot_id=tok.eot_id, lexicon_vocab=lex)
    model = DualEncoder(spec).eval()
    return save_checkpoint(path, model, tok, {"preset": "tiny"})


def image_collection(root: Path, n: int = 40, seed: int = 0) -> Path:
    """n distinct random-block PNGs under root/images/ (in two sub-folders) and root/table.jsonl."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sub = root / "images" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(6):
            x, y = rng.randrange(28), rng.randrange(28)
            im.paste(
                tuple(rng.randrange(256) for _ in range(3)),
                (x, y, x + rng.randrange(2, 12), y + rng.randrange(2, 12)),
            )
        im.save(sub / f"img{i:03d}.png")
        rows.append(
            {
                "image": f"images/{sub.name}/img{i:03d}.png",
                "captions": [f"a {rng.choice(WORDS)} {rng.choice(WORDS)}"],
                "n": i,
            }
        )
    (root / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "table.jsonl"


def search_cli() -> typer.Typer:
    from lipkit.cli.search import register

    app = typer.Typer()
    register(app)
    return app


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_vectors():
    faiss.omp_set_num_threads(1)  # 2 shared cores: OpenMP spinning only slows the build down
    return unit(20_000, 64, 0), unit(200, 64, 1)


@pytest.fixture(scope="module")
def truth(random_vectors):
    base, queries = random_vectors
    return exact_topk(base, queries, 10)


# ------------------------------------------------------------------------------------------------
# dense


def test_exact_topk_matches_a_loop():
    base, q = unit(300, 8, 2), unit(5, 8, 3)
    got = exact_topk(base, q, 7)
    for r in range(5):
        ref = sorted(range(300), key=lambda i: -float(base[i] @ q[r]))[:7]
        assert got[r].tolist() == ref


def test_flat_is_exact(random_vectors, truth):
    base, queries = random_vectors
    ix = build_index(base, "flat")
    scores, ids = ix.search(queries, 10)
    assert neighbour_overlap(ids, truth) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, 1), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize(
    "kind, params, threshold",
    [
        # random unit vectors in 64-d are the hard case (near-uniform distances); measured 0.89
        ("hnsw", {"m": 16, "ef_construction": 80, "ef": 128}, 0.85),
        # 32 codes of 6 bits (24 bytes per vector, 10x smaller than float32); measured 0.52 at nprobe 32
        ("ivfpq", {"nlist": 256, "m": 32, "nbits": 6, "nprobe": 32}, 0.40),
    ],
)
def test_approximate_recall_and_save_load(random_vectors, truth, tmp_path, kind, params, threshold):
    base, queries = random_vectors
    ix = build_index(base, kind, **params)
    scores, ids = ix.search(queries, 10)
    r = neighbour_overlap(ids, truth)
    assert r >= threshold, f"{kind} recall@10 {r:.3f} < {threshold}"
    ix.save(tmp_path / "ix")
    again = load_index(tmp_path / "ix")
    assert isinstance(again, DenseIndex) and again.kind == kind and again.ntotal == len(base)
    assert again.info["params"] == ix.info["params"]
    s2, i2 = again.search(queries, 10)
    np.testing.assert_array_equal(ids, i2)
    np.testing.assert_allclose(scores, s2, rtol=1e-6)
    # a wider search is at least as good
    wide = {"hnsw": {"ef": 256}, "ivfpq": {"nprobe": 128}}[kind]
    assert neighbour_overlap(again.search(queries, 10, **wide)[1], truth) >= r - 0.01


def test_incremental_add_equals_one_build(random_vectors, tmp_path):
    base, queries = random_vectors
    base, half = base[:4000], 2000
    one = build_index(base, "hnsw", m=16, ef_construction=80)
    inc = build_index(
        base[:half], "hnsw", m=16, ef_construction=80, items=[{"path": f"p{i}"} for i in range(half)]
    )
    inc.save(tmp_path / "ix")
    inc = load_index(tmp_path / "ix")
    inc.add(base[half:], [{"path": f"p{i}"} for i in range(half, len(base))])
    inc.save(tmp_path / "ix")
    inc = load_index(tmp_path / "ix")
    assert inc.ntotal == len(base) and [it["id"] for it in inc.items] == list(range(len(base)))
    assert inc.items[3500]["path"] == "p3500"
    truth = exact_topk(base, queries, 10)
    assert neighbour_overlap(inc.search(queries, 10)[1], truth) >= 0.95
    assert neighbour_overlap(one.search(queries, 10)[1], truth) >= 0.95
    # exact index: adding is the same as building at once
    flat = build_index(base[:half], "flat")
    flat.add(base[half:])
    np.testing.assert_array_equal(
        flat.search(queries, 10)[1], build_index(base, "flat").search(queries, 10)[1]
    )
    with pytest.raises(UserError, match="index of 64-d vectors"):
        flat.add(unit(3, 32, 0))


def test_ivfpq_refuses_too_few_vectors():
    with pytest.raises(UserError, match="needs at least 256 vectors"):
        build_index(unit(100, 16, 0), "ivfpq", nlist=4)
    with pytest.raises(UserError, match="does not divide"):
        build_index(unit(1000, 16, 0), "ivfpq", m=5)


def test_k_beyond_the_collection_pads_with_minus_one():
    ix = build_index(unit(5, 8, 0), "hnsw")
    scores, ids = ix.search(unit(2, 8, 1), 8)
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4] and (ids[:, 5:] == -1).all()


# ------------------------------------------------------------------------------------------------
# sparse


def sparse_matrix(n: int, v: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((n, v)).astype(np.float32) * (rng.random((n, v)) < density)
    return m.astype(np.float32)


def test_sparse_equals_dense_dot_product(tmp_path):
    docs, queries = sparse_matrix(3000, 500, 0.03, 0), sparse_matrix(50, 500, 0.05, 1)
    ix = SparseIndex.build(docs)
    dense = queries.astype(np.float64) @ docs.T.astype(np.float64)
    for r in range(len(queries)):
        np.testing.assert_allclose(ix.scores(queries[r]), dense[r], rtol=1e-5, atol=1e-6)
    scores, ids = ix.search(queries, 10)
    for r in range(len(queries)):
        order = sorted(np.flatnonzero(dense[r] > 0).tolist(), key=lambda i: (-dense[r, i], i))[:10]
        assert ids[r, : len(order)].tolist() == order
        np.testing.assert_allclose(scores[r, : len(order)], dense[r, order], rtol=1e-5)
    # save/load and the same answers; a naive loop over postings agrees too
    ix.save(tmp_path / "sp")
    again = load_index(tmp_path / "sp")
    assert isinstance(again, SparseIndex) and again.nnz == int((docs > 0).sum())
    np.testing.assert_array_equal(again.search(queries, 10)[1], ids)
    q = queries[0]
    naive = np.zeros(len(docs))
    for t in np.flatnonzero(q):
        for p in range(again.indptr[t], again.indptr[t + 1]):
            naive[again.indices[p]] += q[t] * again.data[p]
    np.testing.assert_allclose(naive, dense[0], rtol=1e-5)


def test_sparse_only_returns_overlapping_documents_and_add():
    docs = np.zeros((4, 6), np.float32)
    docs[0, 1], docs[1, 1], docs[1, 2], docs[3, 5] = 1.0, 0.5, 2.0, 3.0
    ix = SparseIndex.build(docs)
    q = np.zeros(6, np.float32)
    q[1] = 1.0
    scores, ids = ix.search(q, 3)
    assert ids[0].tolist() == [0, 1, -1] and scores[0, :2].tolist() == [1.0, 0.5]
    more = np.zeros((2, 6), np.float32)
    more[1, 1] = 4.0
    ix.add(more)
    assert ix.ntotal == 6 and ix.search(q, 3)[1][0].tolist() == [5, 0, 1]
    np.testing.assert_allclose(ix.scores(q), np.concatenate([docs, more]) @ q)
    with pytest.raises(UserError, match="non-negative"):
        SparseIndex.build(-docs)


def test_read_lexical_formats(tmp_path):
    m = sparse_matrix(20, 30, 0.2, 3)
    np.save(tmp_path / "lex.npy", m)
    np.testing.assert_array_equal(np.asarray(read_lexical(tmp_path / "lex.npy")), m)
    rows, cols = np.nonzero(m)
    # SciPy's save_npz layout, written without SciPy
    order = np.lexsort((rows, cols))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=30))])
    np.savez(
        tmp_path / "csc.npz",
        format=np.array(b"csc"),
        shape=np.array(m.shape),
        indptr=indptr,
        indices=rows[order],
        data=m[rows, cols][order],
    )
    got = read_lexical(tmp_path / "csc.npz")
    assert isinstance(got, SparseMatrix)
    np.testing.assert_array_equal(got.toarray(), m)
    a, b = SparseIndex.build(m), SparseIndex.build(got)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)


# ------------------------------------------------------------------------------------------------
# embedding a collection + the CLI


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll")
    return tiny_checkpoint(root / "ckpt"), image_collection(root, n=40)


def test_embed_folder_and_table(collection, tmp_path):
    ckpt, table = collection
    folder = run_embed(ckpt, table.parent / "images", tmp_path / "f", batch_size=16, progress=False)
    tab = run_embed(ckpt, table, tmp_path / "t", batch_size=7, progress=False)
    assert folder.n_embedded == tab.n_embedded == 40 and not folder.has_text and tab.has_text
    ef, et = load_embeddings(tmp_path / "f"), load_embeddings(tmp_path / "t")
    assert ef.image().shape == (40, 16) and ef.image().dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(et.image(), axis=1), 1, atol=1e-5)
    assert (tmp_path / "t" / "text_emb.npy").is_file() and not (tmp_path / "f" / "text_emb.npy").exists()
    # the same image gets the same vector whichever way it was listed (and whatever the batch size)
    by_path = {it["path"]: i for i, it in enumerate(ef.items)}
    for i, it in enumerate(et.items):
        np.testing.assert_allclose(et.image()[i], ef.image()[by_path[it["path"]]], atol=1e-5)
    assert et.items[5]["meta"]["n"] == 5 and et.items[5]["caption"].startswith("a ")


def test_embed_resumes_after_interruption_and_skips_bad_images(collection, tmp_path):
    from lipkit.checkpoint import load_checkpoint

    ckpt, table = collection
    bad = tmp_path / "imgs"
    bad.mkdir()
    for p in sorted((table.parent / "images").rglob("*.png"))[:20]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "img005.png").write_bytes(b"not a png")  # a corrupt file is skipped and counted
    records = collect(bad)
    model, tok, _ = load_checkpoint(ckpt)
    calls = []
    real = model.encode_image

    def dying(x, *a, **kw):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third chunk
        return real(x, *a, **kw)

    model.encode_image = dying
    with pytest.raises(KeyboardInterrupt):
        embed_collection(model, tok, records, tmp_path / "e", chunk_size=4, batch_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "e" / "chunks").iterdir()) == ["00000.npz", "00001.npz"]
    calls.clear()
    model.encode_image = lambda x, *a, **kw: (calls.append(len(x)), real(x, *a, **kw))[1]
    r = embed_collection(model, tok, records, tmp_path / "e", chunk_size=4, batch_size=4, progress=False)
    assert (r.chunks_done_before, r.chunks_computed) == (2, 3) and sum(calls) == 12
    assert (r.n_embedded, r.n_skipped) == (19, 1)
    skipped = json.loads((tmp_path / "e" / "skipped.json").read_text())
    assert skipped[0]["path"].endswith("img005.png") and not (tmp_path / "e" / "chunks").exists()
    # equal to an uninterrupted run
    model.encode_image = real
    full = embed_collection(
        model, tok, records, tmp_path / "full", chunk_size=4, batch_size=4, progress=False
    )
    assert full.n_embedded == 19
    np.testing.assert_allclose(
        load_embeddings(tmp_path / "e").image(), load_embeddings(tmp_path / "full").image(), atol=1e-6
    )
    # a rerun of a complete job does nothing; another source in the same OUT is refused
    again = embed_collection(model, tok, records, tmp_path / "e", chunk_size=4, batch_size=4, progress=False)
    assert again.chunks_computed == 0
    with pytest.raises(UserError, match="another source"):
        embed_collection(model, tok, records[:5], tmp_path / "e", chunk_size=4, progress=False)


def test_cli_embed_index_search(collection, tmp_path):
    ckpt, table = collection
    app, run = search_cli(), CliRunner().invoke
    r = run(app, ["embed", str(ckpt), str(table), str(tmp_path / "emb"), "--chunk-size", "16"])
    assert r.exit_code == 0, r.output
    r = run(
        app, ["index", "build", str(tmp_path / "emb"), str(tmp_path / "ix"), "--kind", "hnsw", "--m", "8"]
    )
    assert r.exit_code == 0, r.output
    r = run(app, ["index", "info", str(tmp_path / "ix")])
    assert r.exit_code == 0 and "hnsw" in r.output and "40" in r.output
    target = json.loads((tmp_path / "emb" / "ids.json").read_text())[7]
    r = run(app, ["search", str(ckpt), str(tmp_path / "ix"), "--image", target["path"], "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"]
    assert hits[0]["id"] == 7 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and len(hits) == 3
    r = run(app, ["search", str(ckpt), str(tmp_path / "ix"), "a red star", "-k", "5"])
    assert r.exit_code == 0 and "score" in r.stdout
    # add the same collection again (refused, then allowed), info counts 80
    r = run(app, ["index", "add", str(tmp_path / "ix"), str(tmp_path / "emb")])
    assert isinstance(r.exception, UserError) and "already in this index" in str(r.exception)
    r = run(app, ["index", "add", str(tmp_path / "ix"), str(tmp_path / "emb"), "--allow-duplicates"])
    assert r.exit_code == 0 and load_index(tmp_path / "ix").ntotal == 80
    # a sparse index from lex.npy beside the embeddings
    np.save(tmp_path / "emb" / "lex.npy", sparse_matrix(40, 300, 0.05, 0))
    r = run(app, ["index", "build", str(tmp_path / "emb"), str(tmp_path / "sp"), "--kind", "sparse"])
    assert r.exit_code == 0, r.output
    r = run(app, ["search", str(ckpt), str(tmp_path / "sp"), "red star", "--json"])
    assert r.exit_code == 0, r.output


def test_lexicon_heads_embed_index_and_search(collection, tmp_path):
    """A model with LexLIP heads: `embed` writes lex.npz (the image head's weights), the sparse index
    over it scores text and image queries by the exact sparse dot product."""
    from lipkit.checkpoint import load_checkpoint
    from lipkit.search.query import Searcher

    _, table = collection
    ckpt = tiny_checkpoint(tmp_path / "lexckpt", seed=3, lexicon=True)
    app, run = search_cli(), CliRunner().invoke
    r = run(app, ["embed", str(ckpt), str(table), str(tmp_path / "emb"), "--chunk-size", "16"])
    assert r.exit_code == 0, r.output
    lex = read_lexical(tmp_path / "emb" / "lex.npz")
    model, tok, _ = load_checkpoint(ckpt)
    items = load_embeddings(tmp_path / "emb").items
    from lipkit.data.images import load_image
    from lipkit.data.transforms import normalize

    images = torch.stack([load_image(it["path"], 32) for it in items])
    with torch.no_grad():
        want = model.encode_image_lexical(normalize(images, model.spec.image_mean, model.spec.image_std))
    dense = lex.toarray()
    np.testing.assert_allclose(dense, want.numpy(), atol=1e-5)
    assert (dense > 0).any() and (dense == 0).any()
    r = run(app, ["index", "build", str(tmp_path / "emb"), str(tmp_path / "sp"), "--kind", "sparse"])
    assert r.exit_code == 0, r.output
    searcher = Searcher(ckpt, tmp_path / "sp")
    for query in (searcher.text_query("a red star"), searcher.image_query(images[7])):
        hits = searcher.search(query, 5)
        scores = dense @ query[0]
        assert [h["score"] for h in hits] == pytest.approx(
            sorted(scores, reverse=True)[: len(hits)], rel=1e-4
        )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["index", "build", "/nonexistent", "OUT"], "does not exist"),
        (["index", "build", "EMB", "OUT", "--kind", "lsh"], "Unknown index kind 'lsh'"),
        (["search", "CKPT", "/nonexistent", "x"], "is not a lipkit index"),
        (["search", "/nonexistent", "/nonexistent", "x"], "is not a lipkit checkpoint"),
        (["index", "info", "/nonexistent"], "is not a lipkit index"),
        (["embed", "CKPT", "/nonexistent.csv", "OUT"], "does not exist"),
    ],
)
def test_cli_errors_are_user_errors(collection, tmp_path, args, needle):
    ckpt, table = collection
    (tmp_path / "EMB").mkdir()
    args = [
        a.replace("CKPT", str(ckpt)).replace("EMB", str(tmp_path / "EMB")).replace("OUT", str(tmp_path / "o"))
        for a in args
    ]
    r = CliRunner().invoke(search_cli(), args)
    assert isinstance(r.exception, UserError), r.output
    assert needle in str(r.exception)
