"""FILIP served token-wise: `lipkit embed` writes a token-wise checkpoint's image tokens, `lipkit index build
--kind tokens` indexes them, and `lipkit search` / `lipkit serve` rank text queries by FILIP's late
interaction exactly as evaluation does (eval.token_similarity); refusals for what a tokens index cannot do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lipkit.checkpoint import load_checkpoint, save_checkpoint
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.errors import UserError
from lipkit.eval import token_similarity
from lipkit.search.embed import run_embed
from lipkit.search.encode import Towers, token_wise_of
from lipkit.search.index import build_index, load_index
from lipkit.search.query import ImageRejected, Searcher
from lipkit.search.token_index import TokenIndex, late_interaction
from test_search_index import image_collection, search_cli, tiny_checkpoint


def test_late_interaction_is_filips_text_to_image_similarity():
    g = torch.Generator().manual_seed(3)
    items = F.normalize(torch.randn(7, 5, 8, generator=g), dim=-1)
    words = F.normalize(torch.randn(3, 6, 8, generator=g), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    _, s_text = token_similarity.pair_scores(items, words, mask)  # (items, texts)
    got = late_interaction(items, words * mask[..., None])
    assert torch.allclose(got, s_text.t(), atol=1e-6)
    for q in range(3):  # a per-word loop
        for n in range(7):
            real = words[q, mask[q]]
            want = torch.stack([(items[n] @ w).max() for w in real]).mean()
            assert torch.isclose(got[q, n], want, atol=1e-6)


def test_token_index_searches_saves_adds_and_refuses(tmp_path):
    g = torch.Generator().manual_seed(4)
    tokens = F.normalize(torch.randn(6, 4, 8, generator=g), dim=-1).numpy()
    ix = build_index(tokens, "tokens", [{"path": f"{i}.png", "caption": None, "meta": {}} for i in range(6)])
    query = np.zeros((1, 5, 8), np.float32)
    query[0, :2] = F.normalize(torch.randn(2, 8, generator=g), dim=-1).numpy()
    scores, ids = ix.search(query, 10)
    brute = late_interaction(torch.from_numpy(tokens), torch.from_numpy(query))[0].numpy()
    assert ids[0, :6].tolist() == np.argsort(-brute, kind="stable").tolist() and (ids[0, 6:] == -1).all()
    assert np.allclose(scores[0, :6], np.sort(brute)[::-1], atol=1e-6)
    ix.save(tmp_path / "ix")
    again = load_index(tmp_path / "ix")
    assert (
        isinstance(again, TokenIndex)
        and again.ntotal == 6
        and again.search(query, 3)[1].tolist() == [ids[0, :3].tolist()]
    )
    again.add(tokens[:2])
    assert again.ntotal == 8 and again.items[7]["id"] == 7
    with pytest.raises(UserError, match="Cannot add 3×8"):
        again.add(tokens[:2, :3])
    with pytest.raises(UserError, match="8-d token features"):
        again.search(np.zeros((1, 5, 4), np.float32), 3)


@pytest.fixture(scope="module")
def filip_collection(tmp_path_factory):
    """A random-weight checkpoint marked as trained with filip, a 12-image collection embedded with it,
    and its tokens index."""
    root = tmp_path_factory.mktemp("token-index")
    model, tok, _ = load_checkpoint(tiny_checkpoint(root / "plain"))
    ckpt = save_checkpoint(root / "ckpt", model, tok, {"preset": "tiny", "train": {"objective": "filip"}})
    table = image_collection(root, n=12)
    run_embed(ckpt, table, root / "emb", batch_size=5, chunk_size=7, progress=False)
    return root, ckpt, table


def test_search_ranks_text_queries_as_evaluation_does(filip_collection):
    root, ckpt, table = filip_collection
    assert token_wise_of(load_checkpoint(ckpt)[2]) == 0  # filip: every token kept
    manifest = json.loads((root / "emb" / "manifest.json").read_text())
    assert manifest["token_wise"] == {"tokens_kept": 0}
    result = CliRunner().invoke(
        search_cli(), ["index", "build", str(root / "emb"), str(root / "ix"), "--kind", "tokens"]
    )
    assert result.exit_code == 0, result.output
    model, tok, _ = load_checkpoint(ckpt)
    records = read_table(table)
    store = ImageStore(records, model.spec.image_size, cache=True)
    images = token_similarity.image_tokens(model.eval(), store, 4)
    assert np.allclose(np.load(root / "emb" / "image_tokens.npy"), images.numpy(), atol=1e-6)
    captions = [r.captions[0] for r in records]
    texts, mask = token_similarity.text_tokens(model, tok, captions, 4)
    _, s_text = token_similarity.pair_scores(images, texts, mask)  # eval's text → image scores
    searcher = Searcher(ckpt, root / "ix")
    for j, caption in enumerate(captions):
        hits = searcher.search(searcher.text_query(caption), 12)
        want = s_text[:, j].numpy()
        got = np.array([h["score"] for h in hits])
        assert np.allclose(got, np.sort(want)[::-1], atol=1e-5)
        assert [h["id"] for h in hits] == np.argsort(-want, kind="stable").tolist()
    with pytest.raises(ImageRejected, match="answers text queries only"):
        searcher.image_query(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(UserError, match="was not trained with filip"):
        Searcher(root / "plain", root / "ix")
    assert Towers.of_checkpoint(ckpt).images_and_tokens is None  # only `lipkit embed` asks for the tokens


def test_tokens_need_a_token_wise_checkpoint_and_dense_builds_say_so(filip_collection, tmp_path):
    root, _, table = filip_collection
    plain = tmp_path / "emb"
    run_embed(root / "plain", table, plain, batch_size=16, progress=False)
    assert not (plain / "image_tokens.npy").exists()
    cli = search_cli()
    refused = CliRunner().invoke(
        cli, ["index", "build", str(plain), str(tmp_path / "ix"), "--kind", "tokens"]
    )
    assert refused.exit_code != 0 and "no image_tokens.npy" in str(refused.exception or refused.output)
    flat = CliRunner().invoke(cli, ["index", "build", str(root / "emb"), str(tmp_path / "flat")])
    assert flat.exit_code == 0 and "--kind tokens" in flat.output


def test_the_server_answers_text_searches_token_wise(filip_collection):
    pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
    from fastapi.testclient import TestClient

    from lipkit.search.request_guards import Limits
    from lipkit.search.server import create_app

    root, ckpt, _ = filip_collection
    if not (root / "ix").exists():
        build_index(np.load(root / "emb" / "image_tokens.npy"), "tokens").save(root / "ix")
    searcher = Searcher(ckpt, root / "ix")
    want = [h["id"] for h in searcher.search(searcher.text_query("a red star"), 5)]
    with TestClient(create_app(searcher, Limits())) as client:
        got = client.get("/search", params={"q": "a red star", "k": 5}).json()
        assert [h["id"] for h in got["results"]] == want
        by_image = client.get("/search", params={"image_id": 0})
        assert by_image.status_code == 400 and "text queries only" in by_image.json()["error"]
        emb = client.post("/embed", data={"q": "a red star"}).json()
        assert emb["type"] == "text_tokens" and emb["dim"] == 16 and len(emb["tokens"]) >= 3


def test_a_token_wise_collection_where_nothing_decodes_says_so(filip_collection, tmp_path):
    root, ckpt, _ = filip_collection
    (tmp_path / "bad.png").write_bytes(b"not an image")
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"image": "bad.png", "captions": ["a red star"]}) + "\n")
    result = run_embed(ckpt, table, tmp_path / "emb", progress=False)
    assert (
        result.n_embedded == 0
        and result.n_skipped == 1
        and not (tmp_path / "emb" / "image_tokens.npy").exists()
    )
