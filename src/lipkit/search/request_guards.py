"""What the search server refuses and how: request limits, the JSON error, a streaming body-size cap
(ASGI middleware), and number parsing with one-sentence errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lipkit.data.image_policy import MAX_PIXELS


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 5 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_video_frames: int = 1800  # frames decoded from an uploaded video query (a minute at 30 fps)
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


MAX_BOXES = 64


def parse_boxes(value: Any) -> list[list[float]]:
    """Boxes for region embeddings: a JSON list (or its text) of [x0, y0, x1, y1], fractions of the
    image side the model sees, 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1, at most MAX_BOXES."""
    example = "e.g. boxes=[[0, 0, 0.5, 0.5], [0.25, 0.25, 1, 1]]"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ApiError(400, f"boxes must be a JSON list of [x0, y0, x1, y1] boxes, {example}.") from None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_BOXES:
        raise ApiError(400, f"boxes must be a list of 1 to {MAX_BOXES} boxes [x0, y0, x1, y1], {example}.")
    for box in value:
        ok = isinstance(box, list) and len(box) == 4
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ApiError(
                400,
                f"The box {box!r} is not [x0, y0, x1, y1] with 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1 (fractions of the side).",
            )
    return [[float(v) for v in box] for box in value]
