"""The server's localisation routes: GET /heatmap (each kind equal to eval.heatmaps on the item's image,
one-sentence refusals, concurrent Grad-CAM requests) and POST /embed with boxes (region embeddings equal
to DualEncoder.encode_region)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")

import numpy as np  # noqa: E402

from lipkit.search.embed import run_embed  # noqa: E402
from lipkit.search.index import build_index, load_index  # noqa: E402
from test_search_index import image_collection, tiny_checkpoint  # noqa: E402
from test_serve_http import running_server  # noqa: E402


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-regions")
    ckpt = tiny_checkpoint(root / "ckpt")
    run_embed(ckpt, image_collection(root, n=12), root / "emb", batch_size=16, progress=False)
    items = json.loads((root / "emb" / "ids.json").read_text())
    build_index(np.load(root / "emb" / "image_emb.npy"), "flat", items).save(root / "index")
    return root, ckpt


@pytest.fixture(scope="module")
def server(collection):
    root, ckpt = collection
    with running_server(ckpt, root / "index") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def item_path(collection, i: int):
    root, _ = collection
    from pathlib import Path

    return Path(load_index(root / "index").items[i]["path"])


def test_heat_map_of_an_item_matches_the_model(client, collection):
    import torch

    from lipkit.checkpoint import load_checkpoint
    from lipkit.data.images import load_image
    from lipkit.data.transforms import normalize
    from lipkit.eval import heatmaps

    _, ckpt = collection
    model, tok, _ = load_checkpoint(ckpt)
    model.eval()
    x = normalize(
        load_image(item_path(collection, 3), model.spec.image_size)[None],
        model.spec.image_mean,
        model.spec.image_std,
    )
    with torch.no_grad():
        text = model.encode_text(tok(["a red star"]))[None]
    want = {
        "similarity": heatmaps.similarity_maps(heatmaps.token_features(model, x), text)[0, 0],
        "gradcam": heatmaps.gradcam_maps(model, x, text)[0, 0],
    }
    for kind, ref in want.items():
        r = client.get("/heatmap", params={"q": "a red star", "id": 3, "kind": kind})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == 3 and body["kind"] == kind and body["query"] == "a red star"
        assert torch.allclose(torch.tensor(body["grid"]), ref, atol=2e-4)
        assert body["peak"] == pytest.approx(heatmaps.peak_points(torch.tensor(body["grid"])).tolist())
    assert client.get("/heatmap", params={"q": "a red star", "id": 3, "kind": "filip"}).status_code == 200
    for params, status, words in (
        ({"q": "x", "id": 3, "kind": "magic"}, 400, "kind must be one of"),
        ({"q": "x"}, 400, "Send q (the words) and id"),
        ({"q": "x", "id": 999}, 404, "There is no item 999"),
    ):
        r = client.get("/heatmap", params=params)
        assert r.status_code == status and words in r.json()["error"], r.text


def test_embed_with_boxes_gives_region_embeddings(client, collection):
    import torch

    from lipkit.checkpoint import load_checkpoint
    from lipkit.data.images import load_image
    from lipkit.data.transforms import normalize

    _, ckpt = collection
    model, _, _ = load_checkpoint(ckpt)
    path = item_path(collection, 5)
    boxes = [[0, 0, 0.5, 0.5], [0.25, 0.1, 1, 0.9]]
    r = client.post("/embed", files={"file": path.read_bytes()}, data={"boxes": json.dumps(boxes)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "regions" and body["boxes"] == boxes and len(body["embeddings"]) == 2
    x = normalize(load_image(path, model.spec.image_size)[None], model.spec.image_mean, model.spec.image_std)
    with torch.no_grad():
        want = model.eval().encode_region(x, [boxes])
    assert torch.allclose(torch.tensor(body["embeddings"]), want, atol=1e-5)
    raw = client.post(
        "/embed",
        params={"boxes": "[[0, 0, 1, 1]]"},
        content=path.read_bytes(),
        headers={"content-type": "image/png"},
    )
    assert raw.status_code == 200 and len(raw.json()["embeddings"]) == 1
    for boxes_field, words in (
        ("[[0.5, 0, 0.2, 1]]", "is not [x0, y0, x1, y1]"),
        ("nope", "must be a JSON list"),
        ("[]", "1 to 64 boxes"),
    ):
        r = client.post("/embed", files={"file": path.read_bytes()}, data={"boxes": boxes_field})
        assert r.status_code == 400 and words in r.json()["error"], r.text
    r = client.post("/embed", data={"q": "a red star", "boxes": "[[0, 0, 1, 1]]"})
    assert r.status_code == 400 and "boxes go with an image" in r.json()["error"]


def test_concurrent_gradcam_requests_all_answer(server):
    def ask(i: int) -> int:
        with httpx.Client(base_url=server, timeout=60) as c:
            return c.get(
                "/heatmap", params={"q": f"a red star {i}", "id": i % 5, "kind": "gradcam"}
            ).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(24))) == [200] * 24
