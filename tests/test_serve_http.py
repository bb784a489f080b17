"""`lipkit serve` as a real uvicorn server in a subprocess on a free loopback port: search by text, by
uploaded image and by item id, /embed, /image, /health, /docs — and every malformed request is a 4xx
with a JSON error, never a 500. `-m slow`: a load test (2,000 requests at concurrency 16)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'lipkit[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install httpx)")

import lipkit  # noqa: E402
from conftest import free_port  # noqa: E402
from lipkit.search.embed import run_embed  # noqa: E402
from lipkit.search.index import build_index, load_index  # noqa: E402
from test_search_index import image_collection, tiny_checkpoint  # noqa: E402

SERVE = "import typer; from lipkit.cli.search import register; app = typer.Typer(); register(app); app()"


@contextmanager
def running_server(ckpt: Path, index: Path, *extra: str):
    """`lipkit serve` in a subprocess; yields its base URL once /health answers."""
    port = free_port()
    src = str(Path(lipkit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    log = open(index.parent / f"server-{port}.log", "w")  # noqa: SIM115  # closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SERVE,
            "serve",
            str(ckpt),
            str(index),
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{(index.parent / log.name).read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(root / "ckpt")
    table = image_collection(root, n=40)
    run_embed(ckpt, table, root / "emb", batch_size=16, progress=False)
    ix = build_index(
        np.load(root / "emb" / "image_emb.npy"), "flat", json.loads((root / "emb" / "ids.json").read_text())
    )
    ix.save(root / "index")
    return root, ckpt


@pytest.fixture(scope="module")
def server(collection):
    root, ckpt = collection
    # a low pixel limit so a decompression-bomb-like image stays a small file in the test
    with running_server(ckpt, root / "index", "--max-pixels", "1000000", "--max-query-chars", "200") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def png_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def item_path(collection, i: int) -> Path:
    root, _ = collection
    return Path(load_index(root / "index").items[i]["path"])


def test_health_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["index"] == {"kind": "flat", "items": 40, "dim": 16}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/search" in page.text and "cdn" not in page.text.lower() and "https://" not in page.text
    schema = client.get("/openapi.json").json()
    assert {"/search", "/embed", "/health", "/image/{item}"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    if "/docs-static/" in docs.text:  # fastapi-offline installed: the assets are served locally
        assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200


def test_search_by_text(client):
    r = client.get("/search", params={"q": "a red star", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"type": "text", "value": "a red star"} and len(body["results"]) == 5
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    first = body["results"][0]
    assert first["image"] == f"/image/{first['id']}" and first["caption"].startswith("a ")
    # POST as JSON and as a form give the same answer
    for kw in ({"json": {"q": "a red star", "k": 5}}, {"data": {"q": "a red star", "k": "5"}}):
        again = client.post("/search", **kw)
        assert again.status_code == 200, again.text
        assert [h["id"] for h in again.json()["results"]] == [h["id"] for h in body["results"]]


def test_search_by_uploaded_image_finds_itself(client, collection):
    path = item_path(collection, 11)
    r = client.post("/search", files={"file": (path.name, path.read_bytes(), "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert hits[0]["id"] == 11 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and len(hits) == 3
    raw = client.post("/search?k=2", content=path.read_bytes(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["results"][0]["id"] == 11
    by_id = client.get("/search", params={"image_id": 11, "k": 4}).json()
    assert by_id["query"] == {"type": "image_id", "value": 11} and by_id["results"][0]["id"] == 11


def test_image_and_embed(client, collection):
    root, _ = collection
    path = item_path(collection, 3)
    r = client.get("/image/3")
    assert (
        r.status_code == 200 and r.content == path.read_bytes() and r.headers["content-type"] == "image/png"
    )
    e = client.post("/embed", files={"file": ("x.png", path.read_bytes(), "image/png")}).json()
    assert e["type"] == "image" and e["dim"] == 16
    np.testing.assert_allclose(e["embedding"], np.load(root / "emb" / "image_emb.npy")[3], atol=1e-5)
    t = client.post("/embed", json={"q": "a green moon"}).json()
    assert t["type"] == "text" and np.linalg.norm(t["embedding"]) == pytest.approx(1.0, abs=1e-5)


def bomb_png() -> bytes:  # 2000×2000 = 4 MP over the 1 MP limit, yet a small file
    buf = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buf, "PNG")
    return buf.getvalue()


def truncated_png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


BAD = {
    "not an image": dict(
        method="POST", url="/search", files={"file": ("x.png", b"hello, world" * 10, "image/png")}
    ),
    "empty file": dict(method="POST", url="/search", files={"file": ("x.png", b"", "image/png")}),
    "truncated image": dict(
        method="POST", url="/search", files={"file": ("x.png", truncated_png(), "image/png")}
    ),
    "too many pixels": dict(method="POST", url="/search", files={"file": ("b.png", bomb_png(), "image/png")}),
    "huge upload": dict(
        method="POST", url="/search", files={"file": ("x.png", b"\0" * (6 * 2**20), "image/png")}
    ),
    "huge raw body": dict(
        method="POST", url="/embed", content=b"\0" * (6 * 2**20), headers={"content-type": "image/png"}
    ),
    "empty query": dict(method="GET", url="/search", params={"q": "   "}),
    "no query": dict(method="GET", url="/search"),
    "long query": dict(method="GET", url="/search", params={"q": "a" * 201}),
    "k too large": dict(method="GET", url="/search", params={"q": "a cat", "k": 101}),
    "k zero": dict(method="GET", url="/search", params={"q": "a cat", "k": 0}),
    "k not a number": dict(method="POST", url="/search", json={"q": "a cat", "k": "ten"}),
    "wrong content type": dict(
        method="POST", url="/search", content=b"q=cat", headers={"content-type": "text/plain"}
    ),
    "no content type": dict(method="POST", url="/embed", content=b"cat"),
    "bad json": dict(
        method="POST", url="/search", content=b"{q: cat", headers={"content-type": "application/json"}
    ),
    "json not an object": dict(method="POST", url="/search", json=["cat"]),
    "json q not text": dict(method="POST", url="/embed", json={"q": 5}),
    "text and image to embed": dict(
        method="POST", url="/embed", files={"file": ("x.png", png_bytes(), "image/png")}, data={"q": "cat"}
    ),
    "composed with empty words": dict(method="GET", url="/search", params={"q": "  ", "image_id": 1}),
    "composed on an unknown item": dict(method="GET", url="/search", params={"q": "cat", "image_id": 4000}),
    "file as text field": dict(method="POST", url="/search", data={"file": "cat.png"}),
    "broken multipart": dict(
        method="POST",
        url="/search",
        content=b"--xx\r\nbroken",
        headers={"content-type": "multipart/form-data; boundary=xx"},
    ),
    "unknown item": dict(method="GET", url="/image/4000"),
    "item not a number": dict(method="GET", url="/image/abc"),
    "path traversal": dict(method="GET", url="/image/..%2F..%2Fetc%2Fpasswd"),
    "search unknown item": dict(method="GET", url="/search", params={"image_id": -1}),
    "unknown path": dict(method="GET", url="/nope"),
    "wrong method": dict(method="DELETE", url="/search"),
}
EXPECTED = {
    "too many pixels": 413,
    "huge upload": 413,
    "huge raw body": 413,
    "wrong content type": 415,
    "no content type": 415,
    "unknown item": 404,
    "item not a number": 404,
    "path traversal": 404,
    "search unknown item": 404,
    "composed on an unknown item": 404,
    "unknown path": 404,
    "wrong method": 405,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_4xx_with_a_clear_json_message(client, case):
    r = client.request(**BAD[case])
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if case in EXPECTED:
        assert r.status_code == EXPECTED[case], r.text
    body = r.json()
    assert isinstance(body["error"], str) and len(body["error"]) > 20 and body["status"] == r.status_code
    assert "Traceback" not in body["error"]


def test_chunked_upload_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(7):
            yield b"\0" * 2**20

    with httpx.Client(base_url=server, timeout=30) as c:
        r = c.post("/search", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "upload limit" in r.json()["error"]


def test_server_still_healthy_after_abuse(client):
    assert client.get("/health").status_code == 200
    assert client.get("/search", params={"q": "a blue sun"}).status_code == 200


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


@pytest.mark.slow
def test_load_2000_requests_at_concurrency_16(server, collection):
    """2,000 mixed requests (text GET, JSON POST, image upload) from 16 concurrent clients."""
    path = item_path(collection, 5)
    image = path.read_bytes()
    words = ["red", "blue", "green", "star", "moon", "cat", "dog", "tree", "sun", "heart"]
    n, concurrency = 2000, 16
    latencies: list[float] = []
    errors: list[str] = []

    async def one(c, i: int) -> None:
        t0 = time.perf_counter()
        try:
            if i % 10 == 0:
                r = await c.post("/search", files={"file": ("x.png", image, "image/png")}, data={"k": "10"})
            elif i % 3 == 0:
                r = await c.post("/search", json={"q": f"a {words[i % 10]} {words[(i // 10) % 10]}", "k": 10})
            else:
                r = await c.get(
                    "/search", params={"q": f"{words[i % 7]} {words[(i // 7) % 10]} {i}", "k": 20}
                )
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
        except httpx.HTTPError as e:
            errors.append(repr(e))
        latencies.append(time.perf_counter() - t0)

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as c:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(n):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    await one(c, queue.get_nowait())

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    p50, p99 = 1000 * percentile(latencies, 50), 1000 * percentile(latencies, 99)
    print(
        f"\nload test: {n} requests, concurrency {concurrency}, {len(errors)} errors, {n / wall:.0f} req/s, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, wall {wall:.1f} s"
    )
    assert not errors, errors[:5]
    assert len(latencies) == n


def test_images_from_shards_are_served_from_the_embeddings_folder(tmp_path):
    """Shard images have no file of their own: embed keeps their bytes in images.bin and /image/{id}
    answers with exactly those bytes (in-process app; the routes are the same as under uvicorn)."""
    from fastapi.testclient import TestClient

    from lipkit.data.convert import convert
    from lipkit.search.query import Searcher
    from lipkit.search.server import create_app

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    table = image_collection(tmp_path, n=12)
    convert(table, tmp_path / "shards", shard_size=5, progress=False)
    run_embed(ckpt, tmp_path / "shards", tmp_path / "emb", batch_size=4, progress=False)
    items = json.loads((tmp_path / "emb" / "ids.json").read_text())
    assert all(it["path"] is None and it["blob"]["size"] > 0 for it in items)
    build_index(np.load(tmp_path / "emb" / "image_emb.npy"), "flat", items).save(tmp_path / "index")
    by_key = {json.loads(line)["image"]: line for line in table.read_text().splitlines()}
    with TestClient(create_app(Searcher(ckpt, tmp_path / "index"))) as c:
        hits = c.post("/search", json={"q": "a red star", "k": 3}).json()["results"]
        assert len(hits) == 3 and all(h["image"] == f"/image/{h['id']}" for h in hits)
        for it in items[:4]:
            r = c.get(f"/image/{it['id']}")
            original = next((tmp_path / k).read_bytes() for k in by_key if Path(k).stem in it["key"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content == original
