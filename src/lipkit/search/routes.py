"""The routes of the search server, as module-level functions over one `SearchState` (the searcher,
the limits, where the Swagger UI files are), kept on `app.state.search`."""

from __future__ import annotations

import dataclasses
import math
import mimetypes
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from lipkit import __version__
from lipkit.data.images import sniff_image_type
from lipkit.eval.heatmaps import MAP_KINDS
from lipkit.search.batcher import MicroBatcher
from lipkit.search.heatmap import query_heatmap
from lipkit.search.index_format import item_bytes
from lipkit.search.metrics import CONTENT_TYPE, ServerMetrics
from lipkit.search.query import Searcher, decode_image_bytes, decode_upload
from lipkit.search.request_guards import ApiError, Limits, parse_boxes, parse_int
from lipkit.search.request_reading import check_text, read_input

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "An image file."},
                        "q": {
                            "type": "string",
                            "description": "A text query; beside a file (/search), the words that change "
                            "the image (a composed query).",
                        },
                        "k": {"type": "integer", "minimum": 1, "maximum": 100},
                        "boxes": {
                            "type": "string",
                            "description": "/embed only, with a file: a JSON list of [x0, y0, x1, y1] boxes "
                            "(fractions of the side of the centre square the model sees); one region "
                            "embedding per box.",
                        },
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}, "k": {"type": "integer"}},
                    "required": ["q"],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


INLINE_SEARCH_S = 0.0005


def page_html() -> str:
    return (resources.files("lipkit.search") / "page.html").read_text(encoding="utf-8")


@dataclass
class SearchState:
    """What the routes share: the model and index, the limits, where the Swagger UI files are (None: a
    CDN), the micro-batcher (None: one model call per request on the thread pool) and the metrics."""

    searcher: Searcher
    limits: Limits
    assets: Path | None = None
    batcher: MicroBatcher | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    auth_required: bool = False
    search_seconds: float = math.inf  # running mean of index lookups; the first one runs on a thread

    @property
    def n_items(self) -> int:
        return self.searcher.index.ntotal

    def get_k(self, fields: dict[str, Any]) -> int:
        return parse_int(fields.get("k", self.limits.default_k), "k", 1, self.limits.max_k)

    def item_id(self, value: Any) -> int:
        n = self.n_items
        try:
            i = int(str(value))
        except ValueError:
            raise ApiError(404, f"'{value}' is not an item id; ids are whole numbers 0..{n - 1}.") from None
        if not 0 <= i < n:
            raise ApiError(404, f"There is no item {i}; the index holds {n} items (ids 0..{n - 1}).")
        return i

    async def text_vector(self, text: str) -> np.ndarray:
        """(1, D): the query vector of a text, batched with other texts when batching is on."""
        if self.batcher is None:
            return await run_in_threadpool(self.searcher.text_query, text)
        return (await self.batcher.encode("text", text))[None]

    async def image_vector(self, image_u8: torch.Tensor) -> np.ndarray:
        """(1, D): the query vector of a decoded image, batched with other images when batching is on."""
        self.searcher.check_image_queries()
        if self.batcher is None:
            return await run_in_threadpool(self.searcher.image_query, image_u8)
        return (await self.batcher.encode("video" if image_u8.dim() == 4 else "image", image_u8))[None]

    async def upload_vector(self, data: bytes) -> np.ndarray:
        """(1, D): the query vector of an uploaded image or video (search.query.decode_upload)."""
        s, lim = self.searcher, self.limits
        image_u8 = await run_in_threadpool(
            decode_upload, data, s.size, lim.max_pixels, lim.max_video_frames, s.clip_frames
        )
        return await self.image_vector(image_u8)

    async def item_image(self, i: int) -> torch.Tensor:
        """The indexed item's image at the model's size: its file, or its bytes kept from a shard."""
        s = self.searcher
        data = item_bytes(s.index.items[i])
        if data is None:
            raise ApiError(
                404, f"Item {i} has no image file on this server; search by text or upload an image."
            )
        if isinstance(data, Path):
            return await run_in_threadpool(s.image_file, data)
        return await run_in_threadpool(decode_image_bytes, data, s.size, self.limits.max_pixels)

    async def item_vector(self, i: int) -> np.ndarray:
        return await self.image_vector(await self.item_image(i))

    async def composed_vector(self, image_u8: torch.Tensor, text: str) -> np.ndarray:
        """(1, D): a reference image changed by words (Searcher.composed_query), batched with other
        composed queries when batching is on."""
        self.searcher.check_composed_queries()
        if self.batcher is None:
            return await run_in_threadpool(self.searcher.composed_query, image_u8, text)
        return (await self.batcher.encode("composed", (image_u8, text)))[None]

    def _timed_search(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        hits = self.searcher.search(vector, k)
        took = time.perf_counter() - t0
        self.search_seconds = (
            took if math.isinf(self.search_seconds) else 0.9 * self.search_seconds + 0.1 * took
        )
        return hits

    async def text_search(self, text: str, k: int) -> list[dict[str, Any]]:
        """A text query's top k, its first hits re-ordered by the matching head when the server re-ranks."""
        s = self.searcher
        hits = await self.search(await self.text_vector(text), max(k, s.rerank_top))
        if s.rerank_top:
            hits = await run_in_threadpool(s.rerank, text, hits, self.limits.max_pixels)
        return hits[:k]

    async def search(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The index lookup: on the event loop while lookups take under INLINE_SEARCH_S on average (a
        thread hop costs more than an HNSW or small flat search), else on the thread pool."""
        if self.search_seconds < INLINE_SEARCH_S:
            return self._timed_search(vector, k)
        return await run_in_threadpool(self._timed_search, vector, k)


def _state(request: Request) -> SearchState:
    return request.app.state.search


def respond(kind: str, query: Any, hits: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """The JSON of a search: hits with an image URL and file name instead of a server path."""
    for h in hits:
        path = h.pop("path", None)
        h["name"] = Path(path).name if path else None
        h["image"] = f"/image/{h['id']}" if h.pop("has_image", bool(path)) else None
    return {
        "query": {"type": kind, "value": query},
        "k": len(hits),
        "results": hits,
        "took_ms": round(1000 * (time.perf_counter() - t0), 2),
    }


def docs(request: Request) -> HTMLResponse:
    urls = {}
    if _state(request).assets is not None:
        urls = {
            "swagger_js_url": "/docs-static/swagger-ui-bundle.js",
            "swagger_css_url": "/docs-static/swagger-ui.css",
            "swagger_favicon_url": "/docs-static/favicon.png",
        }
    return get_swagger_ui_html(openapi_url="/openapi.json", title="lipkit search — API", **urls)


def index_page() -> HTMLResponse:
    return HTMLResponse(page_html())


def health(request: Request) -> dict[str, Any]:
    """Liveness and what is loaded."""
    st = _state(request)
    s, lim = st.searcher, st.limits
    return {
        "status": "ok",
        "version": __version__,
        "index": {"kind": s.index.kind, "items": st.n_items, "dim": s.index.dim},
        "model": {"embed_dim": s.dim, "image_size": s.size, "runtime": s.runtime},
        "limits": {
            "max_upload_bytes": lim.max_upload_bytes,
            "max_pixels": lim.max_pixels,
            "max_query_chars": lim.max_query_chars,
            "max_k": lim.max_k,
        },
        "serving": {
            "batching": st.batcher is not None,
            **({} if st.batcher is None else dataclasses.asdict(st.batcher.settings)),
            "auth": st.auth_required,
            "rerank": s.rerank_top,  # text queries' hits re-ordered by the matching head (0: off)
        },
    }


async def search_get(
    request: Request, q: str | None = None, k: str | None = None, image_id: str | None = None
) -> dict[str, Any]:
    """Search by text (`q`), by the image of an indexed item (`image_id`), or by that image changed by the
    words (both: a composed query)."""
    t0 = time.perf_counter()
    st = _state(request)
    kk = st.get_k({"k": k} if k is not None else {})
    if image_id is not None and q is not None:
        i, text = st.item_id(image_id), check_text(q, st.limits)
        vector = await st.composed_vector(await st.item_image(i), text)
        return respond("composed", {"image_id": i, "text": text}, await st.search(vector, kk), t0)
    if image_id is not None:
        i = st.item_id(image_id)
        return respond("image_id", i, await st.search(await st.item_vector(i), kk), t0)
    if q is None:
        raise ApiError(400, "Nothing to search for; add ?q=some+words (or ?image_id=N, or POST an image).")
    text = check_text(q, st.limits)
    return respond("text", text, await st.text_search(text, kk), t0)


async def search_post(request: Request) -> dict[str, Any]:
    """Search by an uploaded image (`file`), a text query (`q`) or both (the image changed by the words);
    `k` results (1..100)."""
    t0 = time.perf_counter()
    st = _state(request)
    text, image, fields = await read_input(request, st.limits)
    kk = st.get_k(fields)
    if image is not None and text is not None:
        s = st.searcher
        image_u8 = await run_in_threadpool(decode_image_bytes, image, s.size, st.limits.max_pixels)
        vector = await st.composed_vector(image_u8, text)
        return respond("composed", {"text": text}, await st.search(vector, kk), t0)
    if image is not None:
        return respond("image", None, await st.search(await st.upload_vector(image), kk), t0)
    assert text is not None
    return respond("text", text, await st.text_search(text, kk), t0)


async def embed(request: Request) -> dict[str, Any]:
    """The embedding of a text (`q`) or an uploaded image (`file`) — the vector the index compares (a tokens
    index: a text's token features); with `boxes` beside an image, one region embedding per box
    (DualEncoder.encode_region)."""
    st = _state(request)
    text, image, fields = await read_input(request, st.limits)
    if "boxes" in fields:
        if image is None:
            raise ApiError(400, "boxes go with an image: upload the image as 'file' beside the boxes field.")
        return await _region_embeddings(st, image, parse_boxes(fields["boxes"]))
    if image is not None and text is not None:
        raise ApiError(
            400, "Send either a text query q or an image file to /embed, not both (/search takes both)."
        )
    if image is not None:
        vec, kind = await st.upload_vector(image), "image"
    else:
        assert text is not None
        vec, kind = await st.text_vector(text), "text"
    v = np.asarray(vec)[0]
    if st.searcher.token_wise:  # a text's token features, the real tokens only (search.token_index)
        real = v[np.abs(v).sum(1) > 0]
        return {
            "type": "text_tokens",
            "dim": int(v.shape[1]),
            "sparse": False,
            "tokens": real.astype(float).tolist(),
        }
    return {
        "type": kind,
        "dim": int(v.shape[0]),
        "sparse": st.searcher.sparse,
        "embedding": v.astype(float).tolist(),
    }


async def heatmap(
    request: Request, q: str | None = None, id: str | None = None, kind: str = "similarity"
) -> dict[str, Any]:
    """Where in item `id`'s image the words `q` match: an h × w grid of scores over the centre square the
    model sees, and its peak (x, y as fractions of the side). `kind`: similarity (token–text cosine),
    gradcam (Grad-CAM, any checkpoint) or filip (word–patch, for FILIP checkpoints); docs/localization.md."""
    st = _state(request)
    if q is None or id is None:
        raise ApiError(
            400, "Send q (the words) and id (an item id) for a heat map, e.g. /heatmap?q=a+red+star&id=0."
        )
    if kind not in MAP_KINDS:
        raise ApiError(400, f"kind must be one of {', '.join(MAP_KINDS)}, not '{kind}'.")
    text, i = check_text(q, st.limits), st.item_id(id)
    image_u8 = await st.item_image(i)
    s = st.searcher
    found = await run_in_threadpool(query_heatmap, s.model, s.tokenizer, image_u8, text, kind, s.precision)
    return {"id": i, "query": text, **found}


async def _region_embeddings(st: SearchState, image: bytes, boxes: list[list[float]]) -> dict[str, Any]:
    s = st.searcher
    image_u8 = await run_in_threadpool(decode_image_bytes, image, s.size, st.limits.max_pixels)
    vectors = await run_in_threadpool(s.region_embeddings, image_u8, boxes)
    return {
        "type": "regions",
        "dim": int(vectors.shape[1]),
        "sparse": False,
        "boxes": boxes,
        "embeddings": vectors.astype(float).tolist(),
    }


def metrics(request: Request) -> Response:
    """Request counts, latency histogram, queue depth, batch sizes and cache hit rate (Prometheus text)."""
    return Response(_state(request).metrics.registry.render(), media_type=CONTENT_TYPE)


def image(request: Request, item: str) -> Response:
    """The image of an indexed item: its file, or its bytes from a shard (kept in images.bin by embed)."""
    st = _state(request)
    i = st.item_id(item)
    data = item_bytes(st.searcher.index.items[i])
    cache = {"Cache-Control": f"{'private' if st.auth_required else 'public'}, max-age=3600"}
    if isinstance(data, Path):
        media = mimetypes.guess_type(data)[0] or "application/octet-stream"
        return FileResponse(data, media_type=media, headers=cache)
    if data is not None:
        media = sniff_image_type(data) or "application/octet-stream"
        return Response(data, media_type=media, headers=cache)
    raise ApiError(404, f"Item {i} has no image file on this server (it was moved or never had one).")


def add_routes(app: FastAPI) -> None:
    """The pages and the API (see `search.server`), in the order the OpenAPI schema lists them."""
    app.get("/docs", include_in_schema=False)(docs)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(index_page)
    app.get("/health")(health)
    app.get("/search")(search_get)
    app.post("/search", openapi_extra=_BODY_DOC)(search_post)
    app.post("/embed", openapi_extra=_BODY_DOC)(embed)
    app.get("/heatmap")(heatmap)
    app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})(metrics)
    app.get(
        "/image/{item}",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "No such item"}},
    )(image)
