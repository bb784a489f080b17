"""The server under load: micro-batching (batches form, the wait is bounded, one bad item fails only
itself, a full queue refuses with Overloaded), the bounded LRU cache, /metrics read by Prometheus' own
text parser, API keys (401 before any model time) and per-client rate limits (429 with Retry-After)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")
parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is not installed")

from lipkit.errors import UserError  # noqa: E402
from lipkit.search.access import AccessSettings, TokenBuckets, read_api_keys  # noqa: E402
from lipkit.search.batcher import BatchSettings, LRUCache, MicroBatcher, Overloaded  # noqa: E402
from lipkit.search.metrics import Registry  # noqa: E402

KEY = "k3y-" + "0123456789abcdef" * 2


class Doubling:
    """A query kind that records its batches: item x → row [2x]; "bad" raises; `delay` s per call."""

    name = "num"

    def __init__(self, delay: float = 0.0, cached: bool = True) -> None:
        self.delay, self.cached, self.calls = delay, cached, []

    def encode(self, items):
        self.calls.append(list(items))
        time.sleep(self.delay)
        if "bad" in items:
            raise ValueError("a bad item")
        return np.array([[2.0 * x] for x in items])

    def cache_key(self, item):
        return item if self.cached else None


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_encoded_together_in_bounded_batches():
    kind = Doubling(delay=0.05, cached=False)
    b = MicroBatcher([kind], BatchSettings(max_batch=8, max_wait_ms=20, max_queue=100), Registry())

    async def main():
        return await asyncio.gather(*(b.encode("num", i) for i in range(20)))

    rows = run(main())
    assert [float(r[0]) for r in rows] == [2.0 * i for i in range(20)]
    assert sum(len(c) for c in kind.calls) == 20
    assert len(kind.calls) <= 4 and max(len(c) for c in kind.calls) <= 8
    assert b.depth == 0


def test_a_lone_item_waits_at_most_max_wait():
    kind = Doubling(cached=False)
    b = MicroBatcher([kind], BatchSettings(max_batch=64, max_wait_ms=30), Registry())

    async def main():
        t0 = time.perf_counter()
        await b.encode("num", 1)
        return time.perf_counter() - t0

    assert run(main()) < 0.5  # not waiting for 63 more items that never come
    assert kind.calls == [[1]]


def test_one_bad_item_fails_only_itself():
    kind = Doubling(delay=0.02, cached=False)
    b = MicroBatcher([kind], BatchSettings(max_batch=8, max_wait_ms=20), Registry())

    async def main():
        return await asyncio.gather(*(b.encode("num", x) for x in (1, "bad", 3)), return_exceptions=True)

    one, bad, three = run(main())
    assert float(one[0]) == 2.0 and float(three[0]) == 6.0 and isinstance(bad, ValueError)


def test_a_full_queue_refuses_with_a_retry_after():
    kind = Doubling(delay=0.1, cached=False)
    b = MicroBatcher([kind], BatchSettings(max_batch=2, max_wait_ms=0, max_queue=4), Registry())

    async def main():
        return await asyncio.gather(*(b.encode("num", i) for i in range(10)), return_exceptions=True)

    out = run(main())
    refused = [r for r in out if isinstance(r, Overloaded)]
    assert len(refused) == 6 and all(r.retry_after >= 1 for r in refused)
    assert "busy" in str(refused[0]) and b.rejected.get("num") == 6


def test_the_cache_never_exceeds_its_bound_and_shares_concurrent_misses():
    kind = Doubling(delay=0.02)
    b = MicroBatcher([kind], BatchSettings(max_batch=4, max_wait_ms=5, cache_size=5), Registry())

    async def main():
        for i in range(50):
            await b.encode("num", i % 12)
            assert b.cache_entries <= 5
        await asyncio.gather(*(b.encode("num", 100) for _ in range(6)))  # one miss, encoded once

    run(main())
    assert sum(c.count(100) for c in kind.calls) == 1
    cache = LRUCache(2)
    for k in "abcab":
        cache.put(k, np.zeros(1))
    assert list(cache.data) == ["a", "b"] and len(cache) == 2


def test_token_buckets_allow_bursts_then_pace():
    now = [0.0]
    tb = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [tb.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert tb.take("a") == pytest.approx(0.5)
    assert tb.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert tb.take("a") == 0.0


def test_api_key_file_errors_are_one_sentence(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        read_api_keys(tmp_path / "nope.txt")
    (tmp_path / "short.txt").write_text("abc\n")
    with pytest.raises(UserError, match="under 16 characters"):
        read_api_keys(tmp_path / "short.txt")
    (tmp_path / "accents.txt").write_text("clé-" + "0123456789abcdef" + "\n")
    with pytest.raises(UserError, match="non-ASCII"):
        read_api_keys(tmp_path / "accents.txt")
    (tmp_path / "keys.txt").write_text(f"# ops team\n{KEY}\n\n{KEY[::-1]}  # ci\nab#cd{KEY}\n")
    assert read_api_keys(tmp_path / "keys.txt") == (KEY, KEY[::-1], f"ab#cd{KEY}")


# -- the app: metrics, keys, limits (in-process, the same routes as under uvicorn) --------------------


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    from lipkit.search.embed import run_embed
    from lipkit.search.index import build_index
    from lipkit.search.query import Searcher
    from test_search_index import image_collection, tiny_checkpoint

    root = tmp_path_factory.mktemp("batching")
    ckpt = tiny_checkpoint(root / "ckpt")
    run_embed(ckpt, image_collection(root, n=12), root / "emb", batch_size=8, progress=False)
    items = __import__("json").loads((root / "emb" / "ids.json").read_text())
    build_index(np.load(root / "emb" / "image_emb.npy"), "flat", items).save(root / "index")
    s = Searcher(ckpt, root / "index")
    calls = []
    original = s.text_queries
    s.text_queries = lambda texts: calls.append(list(texts)) or original(texts)  # type: ignore[method-assign]
    s.model_calls = calls  # type: ignore[attr-defined]
    return s


def client(searcher, **kw):
    from fastapi.testclient import TestClient

    from lipkit.search.server import create_app

    return TestClient(create_app(searcher, **kw))


def test_metrics_are_prometheus_text(searcher):
    with client(searcher, batching=BatchSettings(cache_size=100)) as c:
        for _ in range(3):
            assert c.get("/search", params={"q": "a red star"}).status_code == 200
        assert c.get("/search").status_code == 400
        text = c.get("/metrics").text
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    reqs = {(s.labels["route"], s.labels["status"]): s.value for s in families["lipkit_requests"].samples}
    assert reqs[("/search", "200")] == 3 and reqs[("/search", "400")] == 1
    lat = [
        s for s in families["lipkit_request_duration_seconds"].samples if s.labels.get("route") == "/search"
    ]
    assert any(s.name.endswith("_count") and s.value == 4 for s in lat)
    assert any(s.labels.get("le") == "+Inf" for s in lat)
    assert families["lipkit_queue_depth"].samples[0].value == 0
    assert families["lipkit_cache_hit_ratio"].samples[0].value == pytest.approx(2 / 3)
    hits = {s.labels["kind"]: s.value for s in families["lipkit_cache_hits"].samples}
    assert hits == {"text": 2}


def test_requests_without_a_key_get_401_and_cost_no_model_time(searcher):
    searcher.model_calls.clear()
    with client(searcher, access=AccessSettings((KEY,))) as c:
        r = c.get("/search", params={"q": "a blue moon"})
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert (
            c.post("/embed", json={"q": "a blue moon"}, headers={"X-API-Key": "wrong" * 4}).status_code == 401
        )
        assert c.get("/metrics").status_code == 401 and c.get("/image/0").status_code == 401
        assert searcher.model_calls == []
        assert c.get("/health").json()["serving"]["auth"] is True and c.get("/").status_code == 200
        assert c.get(
            "/search", params={"q": "a blue moon"}, headers={"Authorization": f"Bearer {KEY}"}
        ).is_success
        assert c.post("/embed", json={"q": "a moon"}, headers={"X-API-Key": KEY}).is_success
        image = c.get("/image/0", params={"api_key": KEY})
        assert image.status_code == 200 and image.headers["cache-control"].startswith("private")
        assert c.get("/search", params={"q": "a moon", "api_key": KEY}).status_code == 401  # not in URLs
        text = c.get("/metrics", headers={"X-API-Key": KEY}).text
    assert len(searcher.model_calls) == 2
    reqs = {
        (s.labels["route"], s.labels["status"]): s.value
        for f in parser.text_string_to_metric_families(text)
        if f.name == "lipkit_requests"
        for s in f.samples
    }
    assert reqs[("/search", "401")] == 2 and reqs[("/image/{item}", "401")] == 1


def test_rate_limit_answers_429_with_retry_after(searcher):
    with client(searcher, access=AccessSettings(rate=0.5, burst=2)) as c:
        codes = [c.get("/search", params={"q": "a red star"}).status_code for _ in range(4)]
        assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
        r = c.get("/search", params={"q": "a red star"})
        assert int(r.headers["retry-after"]) >= 1 and "Too many requests" in r.json()["error"]
        assert c.get("/health").status_code == 200  # probes are never limited
        assert c.get("/image/0").status_code == 200 and c.get("/metrics").status_code == 200  # no model time


def test_unbatched_app_answers_the_same(searcher):
    with client(searcher, batching=None) as c, client(searcher) as d:
        a = c.post("/embed", json={"q": "a green circle"}).json()["embedding"]
        b = d.post("/embed", json={"q": "a green circle"}).json()["embedding"]
        assert c.get("/health").json()["serving"]["batching"] is False
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_overload_answers_503_with_retry_after_not_a_timeout(searcher):
    """20 concurrent searches against a slow model and a queue of 4: each ends at once in 200 or 503."""
    import httpx

    from lipkit.search.server import create_app

    original = searcher.text_queries

    def slow(texts):
        time.sleep(0.2)
        return original(texts)

    app = create_app(searcher, batching=BatchSettings(max_batch=2, max_wait_ms=0, max_queue=4, cache_size=0))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=10) as c:
            return await asyncio.gather(*(c.get("/search", params={"q": f"a star {i}"}) for i in range(20)))

    searcher.text_queries = slow
    try:
        t0 = time.perf_counter()
        answers = run(main())
        took = time.perf_counter() - t0
    finally:
        searcher.text_queries = original
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 503} and codes.count(503) >= 10 and took < 5
    busy = next(r for r in answers if r.status_code == 503)
    assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]


def test_bf16_inference_casts_once_and_answers_as_autocast_does(tmp_path):
    import torch

    from lipkit.checkpoint import load_checkpoint
    from lipkit.search.encode import encode_images, encode_texts, inference_precision, prepare_for_inference
    from test_search_index import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    model, tok, _ = load_checkpoint(ckpt)
    texts, u8 = ["a red star", "a blue moon"], torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.autocast("cpu", torch.bfloat16):
        want_t, want_i = encode_texts(model.eval(), tok, texts), encode_images(model, u8)
    prepare_for_inference(model, "bf16")
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    with inference_precision(model, "bf16"):
        got_t, got_i = encode_texts(model, tok, texts), encode_images(model, u8)
    assert got_t.dtype == np.float32
    np.testing.assert_array_equal(got_t, want_t)
    np.testing.assert_array_equal(got_i, want_i)


def test_close_settles_queued_queries_and_cached_rows_are_copies():
    kind = Doubling(delay=0.3, cached=True)
    b = MicroBatcher([kind], BatchSettings(max_batch=1, max_wait_ms=0, max_queue=10), Registry())

    async def main():
        first = asyncio.ensure_future(b.encode("num", 1))
        await asyncio.sleep(0.05)  # item 1 is being encoded
        rest = [asyncio.ensure_future(b.encode("num", i)) for i in range(2, 6)]
        await asyncio.sleep(0.01)
        b.close()
        return await asyncio.wait_for(asyncio.gather(first, *rest, return_exceptions=True), 2)

    out = run(main())
    assert all(isinstance(r, RuntimeError) for r in out[1:]) and "shutting down" in str(out[1])
    kind = Doubling(cached=True)
    b = MicroBatcher([kind], BatchSettings(max_batch=8, max_wait_ms=10), Registry())

    async def cached():
        await asyncio.gather(*(b.encode("num", i) for i in range(4)))
        return b.lanes["num"].cache.get(2)

    assert run(cached()).base is None  # its own memory, not a view pinning the whole batch
