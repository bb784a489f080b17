"""Composed queries (a reference image changed by words) from Python, the CLI and HTTP: the query vector is
the checkpoint's pseudo-word sentence when it has a Pic2Word/RTD mapping, else the normalised sum of the
image and text embeddings — each checked against that formula computed here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from lipkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lipkit.models.pseudo_word import PROMPT, PseudoWord, composed_features  # noqa: E402
from lipkit.search.embed import run_embed  # noqa: E402
from lipkit.search.index import build_index, load_index  # noqa: E402
from test_search_index import image_collection, tiny_checkpoint  # noqa: E402
from test_serve_http import running_server  # noqa: E402

WORDS = "a red star"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A plain tiny checkpoint, the same with a (random) Pic2Word mapping, and a flat index of 20 images."""
    root = tmp_path_factory.mktemp("composed")
    plain = tiny_checkpoint(root / "plain")
    model, tok, config = load_checkpoint(plain)
    torch.manual_seed(1)
    word = PseudoWord(model.spec.embed_dim, model.text.word_width, hidden=32, dropout=0.1).eval()
    model.add_adapter({"method": "pic2word", "hidden": 32, "dropout": 0.1, "prompt": PROMPT}, word)
    mapped = save_checkpoint(root / "mapped", model, tok, {"preset": config.get("preset", "tiny")})
    run_embed(plain, image_collection(root, n=20), root / "emb", batch_size=16, progress=False)
    items = json.loads((root / "emb" / "ids.json").read_text())
    build_index(np.load(root / "emb" / "image_emb.npy"), "flat", items).save(root / "index")
    return root, plain, mapped


def expected_query(ckpt, path) -> np.ndarray:
    from lipkit.data.images import load_image

    model, tok, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        v = model.embed_images_u8(load_image(path, model.spec.image_size)[None])
        if model.pseudo_word is None:
            q = v + F.normalize(model.text(tok([WORDS])), dim=-1)
        else:
            q = composed_features(model.text, model.pseudo_word, tok, v, [WORDS], PROMPT)
    return F.normalize(q, dim=-1)[0].numpy()


def best_score(root, q: np.ndarray) -> float:
    vectors = np.load(root / "emb" / "image_emb.npy")
    return float((vectors @ q).max())


@pytest.mark.parametrize("which", ["plain", "mapped"])
def test_cli_composed_query_is_its_formula(collection, which):
    from lipkit.cli import app

    root, plain, mapped = collection
    ckpt = plain if which == "plain" else mapped
    path = load_index(root / "index").items[3]["path"]
    args = ["search", str(ckpt), str(root / "index"), WORDS, "--image", path, "--json", "-k", "5"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert body["query"] == {
        "image": path,
        "text": WORDS,
        "composed": "sum" if which == "plain" else "pic2word",
    }
    assert body["results"][0]["score"] == pytest.approx(
        best_score(root, expected_query(ckpt, path)), abs=1e-5
    )
    r = CliRunner().invoke(app, ["search", str(ckpt), str(root / "index"), "-k", "5"])
    assert r.exit_code == 1 and "or both" in str(r.exception)


def test_http_composed_query_by_upload_and_by_item(collection):
    root, _, mapped = collection
    path = load_index(root / "index").items[3]["path"]
    expected = best_score(root, expected_query(mapped, path))
    with running_server(mapped, root / "index") as url, httpx.Client(base_url=url, timeout=30) as c:
        with open(path, "rb") as f:
            r = c.post(
                "/search", files={"file": ("q.png", f.read(), "image/png")}, data={"q": WORDS, "k": "4"}
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == {"type": "composed", "value": {"text": WORDS}} and len(body["results"]) == 4
        assert body["results"][0]["score"] == pytest.approx(expected, abs=1e-5)
        r = c.get("/search", params={"image_id": 3, "q": WORDS, "k": 4})
        assert r.status_code == 200, r.text
        assert r.json()["query"] == {"type": "composed", "value": {"image_id": 3, "text": WORDS}}
        assert r.json()["results"][0]["score"] == pytest.approx(expected, abs=1e-5)
        with open(path, "rb") as f:  # a raw image body with ?q=: the same composed query
            r = c.post(
                "/search",
                params={"q": WORDS, "k": 2},
                content=f.read(),
                headers={"content-type": "image/png"},
            )
        assert r.json()["query"]["type"] == "composed"
        assert r.json()["results"][0]["score"] == pytest.approx(expected, abs=1e-5)
        # concurrent composed queries are encoded together by the micro-batcher: same answers
        from concurrent.futures import ThreadPoolExecutor

        words = ["a red star", "a blue square", "a green circle", "a red star"]
        alone = [c.get("/search", params={"image_id": 3, "q": w, "k": 3}).json()["results"] for w in words]
        with ThreadPoolExecutor(4) as pool:
            together = list(
                pool.map(
                    lambda w: c.get("/search", params={"image_id": 3, "q": w, "k": 3}).json()["results"],
                    words,
                )
            )
        for x, y in zip(alone, together, strict=True):
            assert [h["id"] for h in x] == [h["id"] for h in y]
            assert [h["score"] for h in x] == pytest.approx([h["score"] for h in y], abs=1e-5)


@pytest.mark.parametrize("which", ["plain", "mapped"])
def test_python_api_composed_query_is_the_same_vector(collection, which):
    import lipkit

    root, plain, mapped = collection
    ckpt = plain if which == "plain" else mapped
    path = load_index(root / "index").items[5]["path"]
    model, _, tok = lipkit.load(ckpt)
    got = lipkit.composed_query(model, tok, path, WORDS)
    assert got.shape == (model.spec.embed_dim,)
    assert np.abs(got.numpy() - expected_query(ckpt, path)).max() < 1e-5
