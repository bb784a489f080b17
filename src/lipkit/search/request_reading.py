"""Reading a search request: the text query or the image bytes, and the other fields (k), from a
multipart or urlencoded form, a JSON object, or a raw image/* body — each refusal an `ApiError` with
one sentence naming the problem and the fix."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from lipkit.search.request_guards import ApiError, BodyTooLarge, Limits

_ACCEPTED = "multipart/form-data with a 'file' or 'q' field, JSON {\"q\": ...}, or an image/* body."


def check_text(q: Any, lim: Limits) -> str:
    """A text query, stripped; refuses non-strings, empty queries and queries over the length limit."""
    if not isinstance(q, str):
        raise ApiError(400, "The query q must be a string; send q=some words.")
    text = q.strip()
    if "\ufffd" in text:  # what a percent-encoded byte that is not UTF-8 decodes to
        raise ApiError(
            400,
            "The query q holds U+FFFD, what undecodable (non-UTF-8) bytes become; send the words UTF-8 encoded.",
        )
    if not text:
        raise ApiError(400, "The query q is empty; type a few words to search for.")
    if len(text) > lim.max_query_chars:
        raise ApiError(
            413 if len(text) > 10 * lim.max_query_chars else 400,
            f"The query is {len(text)} characters long, over the limit of {lim.max_query_chars}; shorten it.",
        )
    return text


async def _read_form(
    request: Request, lim: Limits, fields: dict[str, Any]
) -> tuple[str | None, bytes | None]:
    """(text, image bytes) of a form; its other fields go into `fields`."""
    try:
        form = await request.form(max_files=2, max_fields=10, max_part_size=64 * 1024)
    except BodyTooLarge:
        raise
    except Exception as e:  # malformed multipart framing
        raise ApiError(400, f"The form data cannot be parsed ({e}); send a valid multipart form.") from e
    image: bytes | None = None
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
    return fields.pop("q", None), image  # both: a composed query (an image changed by words)


async def _read_json(request: Request, fields: dict[str, Any]) -> Any:
    """The "q" of a JSON object body; its other keys go into `fields`."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise ApiError(
            400, 'The JSON body is nested too deeply; send a flat object like {"q": "some words"}.'
        ) from None
    except ValueError:  # not JSON, not UTF-8, or an integer over Python's 4300-digit limit
        raise ApiError(400, 'The body is not valid JSON; send {"q": "some words", "k": 10}.') from None
    if not isinstance(body, dict):
        raise ApiError(400, 'The JSON body must be an object like {"q": "some words", "k": 10}.')
    fields.update({k: v for k, v in body.items() if k != "q"})
    text = body.get("q")
    if text is None:
        raise ApiError(400, 'The JSON body has no "q"; send {"q": "some words"} (upload images as a file).')
    return text


async def read_input(request: Request, lim: Limits) -> tuple[str | None, bytes | None, dict[str, Any]]:
    """(checked text, image bytes, other fields) from any accepted body type; text, image or both (a form
    with a file and q: a composed query) are set."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, Any] = dict(request.query_params)
    text: str | None = None
    image: bytes | None = None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        text, image = await _read_form(request, lim, fields)
    elif ctype == "application/json":
        text = await _read_json(request, fields)
    elif ctype.startswith("image/"):
        image = await request.body()
        text = fields.pop("q", None)  # ?q= beside a raw image body: a composed query
    elif not ctype:
        raise ApiError(415, f"The request has no Content-Type; send {_ACCEPTED}")
    else:
        raise ApiError(415, f"Content type '{ctype}' is not supported; send {_ACCEPTED}")
    if text is None and image is None:
        if "q" not in fields:
            raise ApiError(400, "Nothing to search for; send a text query q or an image file.")
        text = fields.pop("q")
    return (check_text(text, lim) if text is not None else None), image, fields
