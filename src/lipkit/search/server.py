"""The search server: a FastAPI app over one checkpoint and one index.

  GET  /              the search page (plain HTML + JS, served from this package)
  GET  /search        ?q=text or ?image_id=N (an indexed item's image), &k=1..100
  POST /search        multipart/form-data (`file` = an image, or `q`), JSON {"q": ..., "k": ...},
                      a form, or a raw image/* body
  POST /embed         the same inputs → the embedding vector
  GET  /image/{id}    the indexed item's image file
  GET  /health        status, index kind/size, model shape
  GET  /docs          OpenAPI (Swagger UI; its files come from the `fastapi-offline` package when it is
                      installed, else from a CDN); /openapi.json the schema

Every refusal is a 4xx with a JSON body {"error": "<one sentence naming the problem and the fix>"}.
Request bodies are capped (default 5 MB) while they stream in, images by pixel count before decoding.
"""

from __future__ import annotations

import json
import mimetypes
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipkit import __version__
from lipkit.errors import UserError
from lipkit.search.http_limits import (  # noqa: F401 - Limits, ApiError, sniff_image_type re-exported
    ApiError,
    BodyLimit,
    BodyTooLarge,
    Limits,
    _error,
    _int,
    sniff_image_type,
)
from lipkit.search.query import ImageRejected, Searcher, decode_image_bytes


def _swagger_assets() -> Path | None:
    """The Swagger UI bundle shipped by the `fastapi-offline` package, when installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    static = Path(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def page_html() -> str:
    return (resources.files("lipkit.search") / "page.html").read_text(encoding="utf-8")


_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "An image file."},
                        "q": {"type": "string", "description": "A text query (instead of a file)."},
                        "k": {"type": "integer", "minimum": 1, "maximum": 100},
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


def create_app(searcher: Searcher, limits: Limits | None = None) -> FastAPI:
    lim = limits or Limits()
    app = FastAPI(
        title="lipkit search",
        version=__version__,
        description="Text→image and image→image search over an embedded collection.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.searcher = searcher
    app.state.limits = lim
    # the whole body may carry the image plus multipart framing and small fields
    app.add_middleware(BodyLimit, limit=lim.max_upload_bytes + 64 * 1024, upload_limit=lim.max_upload_bytes)
    s = searcher
    n_items = s.index.ntotal

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(ImageRejected)
    async def _rejected(_: Request, e: ImageRejected) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(UserError)
    async def _user_error(_: Request, e: UserError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge) -> JSONResponse:
        return _error(
            413,
            f"The request body is over the upload limit of {lim.max_upload_bytes / 2**20:.1f} MB; "
            "send a smaller image.",
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = str(e.detail)
        if e.status_code == 404 and msg == "Not Found":
            msg = "No such page; see /docs for the API, or / for the search page."
        elif e.status_code == 405:
            msg = "This method is not allowed here; see /docs for the methods each path takes."
        return _error(e.status_code, msg)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
        return _error(422, f"{where or 'the request'}: {first.get('msg', 'invalid value')}; see /docs.")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:  # a bug, but still JSON
        return _error(
            500, f"Internal error ({type(e).__name__}); please report it with the request you sent."
        )

    # -- input parsing ---------------------------------------------------------------------
    def check_text(q: Any) -> str:
        if not isinstance(q, str):
            raise ApiError(400, "The query q must be a string; send q=some words.")
        text = q.strip()
        if not text:
            raise ApiError(400, "The query q is empty; type a few words to search for.")
        if len(text) > lim.max_query_chars:
            raise ApiError(
                413 if len(text) > 10 * lim.max_query_chars else 400,
                f"The query is {len(text)} characters long, over the limit of {lim.max_query_chars}; shorten it.",
            )
        return text

    async def read_input(request: Request) -> tuple[str | None, bytes | None, dict[str, Any]]:
        """(text, image bytes, other fields) from any accepted body type."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, Any] = dict(request.query_params)
        text: str | None = None
        image: bytes | None = None
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            try:
                form = await request.form(max_files=2, max_fields=10, max_part_size=64 * 1024)
            except BodyTooLarge:
                raise
            except Exception as e:  # malformed multipart framing
                raise ApiError(
                    400, f"The form data cannot be parsed ({e}); send a valid multipart form."
                ) from e
            try:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if key not in ("file", "image"):
                            raise ApiError(400, f"Unexpected file field '{key}'; send the image as 'file'.")
                        if image is not None:
                            raise ApiError(400, "Send one image per request.")
                        image = await value.read(lim.max_upload_bytes + 1)
                        if len(image) > lim.max_upload_bytes:
                            raise ApiError(413, "The image is over the upload limit; send a smaller file.")
                    elif key in ("file", "image"):
                        raise ApiError(400, f"The '{key}' field must be a file upload, not text.")
                    else:
                        fields[key] = value
            finally:
                await form.close()
            if "q" in fields and image is None:
                text = fields.pop("q")
            elif "q" in fields:
                raise ApiError(400, "Send either a text query q or an image file, not both.")
        elif ctype == "application/json":
            raw = await request.body()
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(
                    400, 'The body is not valid JSON; send {"q": "some words", "k": 10}.'
                ) from None
            if not isinstance(body, dict):
                raise ApiError(400, 'The JSON body must be an object like {"q": "some words", "k": 10}.')
            fields.update({k: v for k, v in body.items() if k != "q"})
            text = body.get("q")
            if text is None:
                raise ApiError(
                    400, 'The JSON body has no "q"; send {"q": "some words"} (upload images as a file).'
                )
        elif ctype.startswith("image/"):
            image = await request.body()
        elif not ctype:
            raise ApiError(
                415,
                "The request has no Content-Type; send multipart/form-data with a 'file' or 'q' field, "
                'JSON {"q": ...}, or an image/* body.',
            )
        else:
            raise ApiError(
                415,
                f"Content type '{ctype}' is not supported; send multipart/form-data with a 'file' or 'q' "
                'field, JSON {"q": ...}, or an image/* body.',
            )
        if text is None and image is None:
            if "q" in fields:
                text = fields.pop("q")
            else:
                raise ApiError(400, "Nothing to search for; send a text query q or an image file.")
        return (check_text(text) if text is not None else None), image, fields

    def get_k(fields: dict[str, Any]) -> int:
        return _int(fields.get("k", lim.default_k), "k", 1, lim.max_k)

    def item_id(value: Any) -> int:
        try:
            i = int(str(value))
        except ValueError:
            raise ApiError(
                404, f"'{value}' is not an item id; ids are whole numbers 0..{n_items - 1}."
            ) from None
        if not 0 <= i < n_items:
            raise ApiError(
                404, f"There is no item {i}; the index holds {n_items} items (ids 0..{n_items - 1})."
            )
        return i

    def respond(kind: str, query: Any, hits: list[dict[str, Any]], t0: float) -> dict[str, Any]:
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

    def search_image_bytes(data: bytes, k: int) -> list[dict[str, Any]]:
        x = decode_image_bytes(data, s.size, lim.max_pixels)
        return s.search(s.image_query(x), k)

    def search_item(i: int, k: int) -> list[dict[str, Any]]:
        path = s.index.items[i].get("path")
        if not path or not Path(path).is_file():
            raise ApiError(
                404, f"Item {i} has no image file on this server; search by text or upload an image."
            )
        return s.search(s.image_query(s.image_file(path)), k)

    # -- routes ----------------------------------------------------------------------------
    assets = _swagger_assets()
    if assets is not None:  # Swagger UI files from a package: /docs works without the internet
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-static", StaticFiles(directory=assets), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        urls = {}
        if assets is not None:
            urls = {
                "swagger_js_url": "/docs-static/swagger-ui-bundle.js",
                "swagger_css_url": "/docs-static/swagger-ui.css",
                "swagger_favicon_url": "/docs-static/favicon.png",
            }
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lipkit search — API", **urls)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page_html())

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        return {
            "status": "ok",
            "version": __version__,
            "index": {"kind": s.index.kind, "items": n_items, "dim": s.index.dim},
            "model": {"embed_dim": s.dim, "image_size": s.size},
            "limits": {
                "max_upload_bytes": lim.max_upload_bytes,
                "max_pixels": lim.max_pixels,
                "max_query_chars": lim.max_query_chars,
                "max_k": lim.max_k,
            },
        }

    @app.get("/search")
    async def search_get(
        q: str | None = None, k: str | None = None, image_id: str | None = None
    ) -> dict[str, Any]:
        """Search by text (`q`) or by the image of an indexed item (`image_id`)."""
        t0 = time.perf_counter()
        kk = get_k({"k": k} if k is not None else {})
        if image_id is not None and q is not None:
            raise ApiError(400, "Send either q or image_id, not both.")
        if image_id is not None:
            i = item_id(image_id)
            return respond("image_id", i, await run_in_threadpool(search_item, i, kk), t0)
        if q is None:
            raise ApiError(
                400, "Nothing to search for; add ?q=some+words (or ?image_id=N, or POST an image)."
            )
        text = check_text(q)
        return respond("text", text, await run_in_threadpool(lambda: s.search(s.text_query(text), kk)), t0)

    @app.post("/search", openapi_extra=_BODY_DOC)
    async def search_post(request: Request) -> dict[str, Any]:
        """Search by an uploaded image (`file`) or a text query (`q`); `k` results (1..100)."""
        t0 = time.perf_counter()
        text, image, fields = await read_input(request)
        kk = get_k(fields)
        if image is not None:
            return respond("image", None, await run_in_threadpool(search_image_bytes, image, kk), t0)
        assert text is not None
        return respond("text", text, await run_in_threadpool(lambda: s.search(s.text_query(text), kk)), t0)

    @app.post("/embed", openapi_extra=_BODY_DOC)
    async def embed(request: Request) -> dict[str, Any]:
        """The embedding of a text (`q`) or an uploaded image (`file`) — the vector the index compares."""
        text, image, _ = await read_input(request)
        if image is not None:

            def run() -> np.ndarray:
                return s.image_query(decode_image_bytes(image, s.size, lim.max_pixels))

            vec, kind = await run_in_threadpool(run), "image"
        else:
            vec, kind = await run_in_threadpool(s.text_query, text), "text"
        v = np.asarray(vec)[0]
        return {
            "type": kind,
            "dim": int(v.shape[0]),
            "sparse": s.sparse,
            "embedding": v.astype(float).tolist(),
        }

    @app.get(
        "/image/{item}",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, 404: {"description": "No such item"}},
    )
    def image(item: str) -> Response:
        """The image of an indexed item: its file, or its bytes from a shard (kept in images.bin by embed)."""
        i = item_id(item)
        entry = s.index.items[i]
        path, blob = entry.get("path"), entry.get("blob")
        cache = {"Cache-Control": "public, max-age=3600"}
        if path and Path(path).is_file():
            media = mimetypes.guess_type(path)[0] or "application/octet-stream"
            return FileResponse(path, media_type=media, headers=cache)
        if blob and Path(blob["file"]).is_file():
            with open(blob["file"], "rb") as f:
                f.seek(int(blob["offset"]))
                data = f.read(int(blob["size"]))
            return Response(data, media_type=sniff_image_type(data), headers=cache)
        raise ApiError(404, f"Item {i} has no image file on this server (it was moved or never had one).")

    return app


def serve(
    checkpoint: str | Path,
    index: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    device: str = "cpu",
    log_level: str = "info",
    threads: int = 1,
) -> None:
    """Run the app under uvicorn. `threads`: intra-op threads per request for torch and FAISS; the
    default 1 is the best throughput on a CPU, where concurrent requests already use every core."""
    try:
        import uvicorn
    except ImportError as e:
        raise UserError(
            "Serving needs uvicorn, which is not installed; run `pip install 'lipkit[serve]'`."
        ) from e
    import torch

    torch.set_num_threads(max(1, threads))
    searcher = Searcher(checkpoint, index, device=device)
    if searcher.index.kind != "sparse":
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
    app = create_app(searcher, limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
