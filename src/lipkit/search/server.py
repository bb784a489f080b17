"""The search server: a FastAPI app over one checkpoint and one index.

  GET  /              the search page (plain HTML + JS, served from this package)
  GET  /search        ?q=text or ?image_id=N (an indexed item's image), &k=1..100
  POST /search        multipart/form-data (`file` = an image, or `q`), JSON {"q": ..., "k": ...},
                      a form, or a raw image/* body
  POST /embed         the same inputs → the embedding vector
  GET  /heatmap       ?q=text&id=N&kind=similarity|gradcam|filip: where in item N's image the text matches
  GET  /image/{id}    the indexed item's image file
  GET  /health        status, index kind/size, model shape, serving settings
  GET  /metrics       Prometheus text: requests by route and status, latency histogram, queue depth,
                      batch sizes, cache entries and hit rate
  GET  /docs          OpenAPI (Swagger UI; its files come from the `fastapi-offline` package when it is
                      installed, else from a CDN); /openapi.json the schema

Concurrent queries of one kind are encoded together (`search.batcher`; off with `batching=None`); a
full queue answers 503 with Retry-After. Optional API keys (401) and per-client rate limits (429) are
checked before anything else (`search.access`).

Every refusal is a 4xx (or that 503) with a JSON body {"error": "<one sentence naming the problem and the fix>"}.
Request bodies are capped (default 5 MB) while they stream in, images by pixel count before decoding.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipkit import __version__
from lipkit.errors import UserError
from lipkit.search.access import AccessControl, AccessSettings
from lipkit.search.batcher import BatchSettings, MicroBatcher, Overloaded
from lipkit.search.index import DENSE_KINDS
from lipkit.search.metrics import RequestMetrics, ServerMetrics
from lipkit.search.query import ImageRejected, Searcher
from lipkit.search.query_kinds import query_kinds
from lipkit.search.request_guards import ApiError, BodyLimit, BodyTooLarge, Limits, error_response
from lipkit.search.routes import SearchState, add_routes


def _swagger_assets() -> Path | None:
    """The Swagger UI bundle shipped by the `fastapi-offline` package, when installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    static = Path(fastapi_offline.__file__).parent / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


# -- refusals: every one a JSON body {"error", "status"} ----------------------------------------


async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message)


async def _rejected(_: Request, e: ImageRejected) -> JSONResponse:
    return error_response(e.status, str(e))


async def _overloaded(_: Request, e: Overloaded) -> JSONResponse:
    resp = error_response(503, str(e))
    resp.headers["Retry-After"] = str(e.retry_after)
    return resp


async def _user_error(_: Request, e: UserError) -> JSONResponse:
    return error_response(400, str(e))


async def _too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
    limit = request.app.state.search.limits.max_upload_bytes
    return error_response(
        413, f"The request body is over the upload limit of {limit / 2**20:.1f} MB; send a smaller image."
    )


async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
    msg = str(e.detail)
    if e.status_code == 404 and msg == "Not Found":
        msg = "No such page; see /docs for the API, or / for the search page."
    elif e.status_code == 405:
        msg = "This method is not allowed here; see /docs for the methods each path takes."
    return error_response(e.status_code, msg)


async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
    return error_response(422, f"{where or 'the request'}: {first.get('msg', 'invalid value')}; see /docs.")


async def _unexpected(_: Request, e: Exception) -> JSONResponse:  # a bug, but still JSON
    return error_response(
        500, f"Internal error ({type(e).__name__}); please report it with the request you sent."
    )


_HANDLERS = (
    (ApiError, _api_error),
    (ImageRejected, _rejected),
    (Overloaded, _overloaded),
    (UserError, _user_error),
    (BodyTooLarge, _too_large),
    (StarletteHTTPException, _http),
    (RequestValidationError, _invalid),
    (Exception, _unexpected),
)


def create_app(
    searcher: Searcher,
    limits: Limits | None = None,
    batching: BatchSettings | None = BatchSettings(),  # noqa: B008 - frozen
    access: AccessSettings | None = None,
) -> FastAPI:
    """The app over one searcher. `batching=None`: one model call per request on the thread pool."""
    lim = limits or Limits()
    app = FastAPI(
        title="lipkit search",
        version=__version__,
        description="Text→image and image→image search over an embedded collection.",
        docs_url=None,
        redoc_url=None,
    )
    assets = _swagger_assets()
    metrics = ServerMetrics()
    batcher = None if batching is None else MicroBatcher(query_kinds(searcher), batching, metrics.registry)
    if batcher is not None:
        app.router.on_shutdown.append(batcher.close)
    auth = access is not None and bool(access.api_keys)
    app.state.search = SearchState(searcher, lim, assets, batcher, metrics, auth)
    # the whole body may carry the image plus multipart framing and small fields
    app.add_middleware(BodyLimit, limit=lim.max_upload_bytes + 64 * 1024, upload_limit=lim.max_upload_bytes)
    if access is not None and (access.api_keys or access.rate > 0):
        app.add_middleware(AccessControl, settings=access)
    app.add_middleware(RequestMetrics, metrics=metrics, router=app.router)  # outermost: counts refusals
    for exc, handler in _HANDLERS:
        app.add_exception_handler(exc, handler)
    if assets is not None:  # Swagger UI files from a package: /docs works without the internet
        from fastapi.staticfiles import StaticFiles

        app.mount("/docs-static", StaticFiles(directory=assets), name="docs-static")
    add_routes(app)
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
    batching: BatchSettings | None = BatchSettings(),  # noqa: B008 - frozen
    access: AccessSettings | None = None,
    precision: str = "fp32",
    onnx: str | Path | None = None,
    rerank: int | None = None,
) -> None:
    """Run the app under uvicorn. `rerank`: hits of a text query re-ordered by the checkpoint's matching
    head (None: 20 when it has one). `threads`: intra-op threads per model call for torch and FAISS; the
    default 1 is the best throughput on a CPU, where text and image batches (or, without batching,
    concurrent requests) already run side by side on the cores."""
    try:
        import uvicorn
    except ImportError as e:
        raise UserError(
            "Serving needs uvicorn, which is not installed; run `pip install 'lipkit[serve]'`."
        ) from e
    import torch

    torch.set_num_threads(max(1, threads))
    searcher = Searcher(
        checkpoint, index, device=device, precision=precision, onnx=onnx, threads=threads, rerank=rerank
    )
    if searcher.index.kind in DENSE_KINDS:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
    app = create_app(searcher, limits, batching, access)
    print(f"serving on http://{host}:{port}/  (API docs: http://{host}:{port}/docs)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
