"""Who may use the server and how often: optional API keys and per-client rate limits, as one ASGI
middleware that answers before any route runs — a refused request reads no body and costs no model time.

- Keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`; `?api_key=KEY` only on `GET /image/{id}` (what
  `<img>` tags on the page can send; a key in a URL reaches logs, so nowhere else). Missing or wrong → 401.
  The page, `/health` and the API docs stay open so a person can see what the server is and a load
  balancer can probe it.
- Rate limits: a token bucket per client (its key when keys are on, else its IP address) charged by the
  routes that spend model time (`/search`, `/embed`, `/heatmap`): `rate` requests per second on average, bursts up to
  `burst`. Over it → 429 with Retry-After. Thumbnails and metrics scrapes are not charged.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from lipkit.errors import UserError
from lipkit.search.request_guards import error_response

OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/favicon.ico")
CHARGED_PATHS = ("/search", "/embed", "/heatmap")
OPEN_PREFIXES = ("/docs-static/",)
MAX_CLIENTS = 100_000  # buckets kept; the least recently seen client is forgotten first


@dataclass(frozen=True)
class AccessSettings:
    api_keys: tuple[str, ...] = ()
    rate: float = 0.0  # requests per second per client; 0: no limit
    burst: int = 0  # bucket size; 0: max(1, 2 × rate)


def read_api_keys(path: Path) -> tuple[str, ...]:
    """One key per line; blank lines and `#` comments ignored; keys of at least 16 characters."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"API key file '{path}' does not exist; write one key per line into it.") from None
    keys = tuple(k for k in (line.split(" #", 1)[0].strip() for line in lines) if k and not k.startswith("#"))
    if not keys:
        raise UserError(
            f"API key file '{path}' holds no keys; write one key per line (e.g. from `openssl rand -hex 24`)."
        )
    if not all(k.isascii() and k.isprintable() for k in keys):
        raise UserError(
            f"API key file '{path}' has a key with non-ASCII or control characters, which HTTP headers "
            "cannot carry; use keys like `openssl rand -hex 24` makes."
        )
    short = [k for k in keys if len(k) < 16]
    if short:
        raise UserError(
            f"API key file '{path}' has {len(short)} key(s) under 16 characters; use long random keys "
            "(e.g. `openssl rand -hex 24`)."
        )
    return keys


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def presented_key(scope: Scope) -> str | None:
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].decode("latin-1").strip()
    if scope.get("method") != "GET" or not scope.get("path", "").startswith("/image/"):
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query["api_key"][0] if "api_key" in query else None


class TokenBuckets:
    """Per-client token buckets, bounded in number of clients."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:  # noqa: ANN001
        self.rate, self.burst, self.clock = rate, burst or max(1, math.ceil(2 * rate)), clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, time)

    def take(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        now = self.clock()
        tokens, then = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self.buckets[client] = (tokens, now)
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return wait


class AccessControl:
    """ASGI middleware: API keys (401) and per-client rate limits (429) before anything else runs."""

    def __init__(self, app: ASGIApp, settings: AccessSettings) -> None:
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys]
        self.buckets = TokenBuckets(settings.rate, settings.burst) if settings.rate > 0 else None

    def _key_ok(self, key: str | None) -> bool:
        if key is None:
            return False
        given = key.encode()
        ok = False
        for k in self.keys:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(given, k)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_open(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        if self.keys:
            key = presented_key(scope)
            if not self._key_ok(key):
                msg = (
                    "This server needs an API key; send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`."
                    if key is None
                    else "The API key is not valid; check it with whoever runs this server."
                )
                resp = error_response(401, msg)
                resp.headers["WWW-Authenticate"] = 'Bearer realm="lipkit"'
                await resp(scope, receive, send)
                return
            client = "key:" + hmac.new(b"lipkit", key.encode(), "sha256").hexdigest()[:16]
        if self.buckets is not None and scope.get("path") in CHARGED_PATHS:
            wait = self.buckets.take(client)
            if wait > 0:
                resp = error_response(
                    429, f"Too many requests from this client; slow down to {self.buckets.rate:g} per second."
                )
                resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
