"""What the search server refuses and how: request limits, the JSON error, a streaming body-size cap
(ASGI middleware), and number parsing with one-sentence errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lipkit.data.image_policy import MAX_PIXELS


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 5 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_query_chars: int = 1000
    max_k: int = 100
    default_k: int = 20


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(Exception):
    pass


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes, by Content-Length up front and by
    counting while the body streams in (chunked uploads carry no length)."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    def _message(self) -> str:
        return (
            f"The request body is over the upload limit of {self.upload_limit / 2**20:.1f} MB; "
            "send a smaller image (or start the server with a larger --max-upload-mb)."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                await error_response(400, "The Content-Length header is not a number; send a valid request.")(
                    scope, receive, send
                )
                return
            if too_big:
                # read (and drop) a moderately large body so the client sees the answer, not a reset
                if int(length) <= 8 * self.limit:
                    more = True
                    while more:
                        msg = await receive()
                        more = msg.get("more_body", False) and msg["type"] == "http.request"
                await error_response(413, self._message())(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return msg

        await self.app(scope, counted, send)


def parse_int(value: Any, name: str, lo: int, hi: int) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number from {lo} to {hi}, got '{value}'.") from None
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be from {lo} to {hi}, got {v}; pick a number in that range.")
    return v
