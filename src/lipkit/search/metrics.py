"""The server's `/metrics`: counters, gauges and histograms written in the Prometheus text exposition
format (version 0.0.4), and the ASGI middleware that counts every request by route and status and
times it. Small on purpose: no global registry, label sets bounded by the routes the app has."""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


@dataclass
class Counter:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *label_values: str, by: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + by

    def get(self, *label_values: str) -> float:
        return self.values.get(label_values, 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        series = self.values or ({(): 0.0} if not self.labels else {})
        for lv, v in sorted(series.items()):
            out.append(f"{self.name}{_labels(self.labels, lv)} {_num(v)}")
        return out


@dataclass
class Gauge:
    """A value read when /metrics is scraped (`read`), so it is never stale."""

    name: str
    help: str
    read: Callable[[], float]

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_num(self.read())}",
        ]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    labels: tuple[str, ...] = ()
    series: dict[tuple[str, ...], list[float]] = field(default_factory=dict)  # bucket counts, sum, count

    def observe(self, value: float, *label_values: str) -> None:
        s = self.series.setdefault(label_values, [0.0] * (len(self.buckets) + 2))
        s[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket whose bound is ≥ value
        s[-2] += value
        s[-1] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for lv, s in sorted(self.series.items()):
            cumulative = 0.0
            for bound, n in zip((*self.buckets, math.inf), s[: len(self.buckets) + 1], strict=True):
                cumulative += n
                le = f'le="{_num(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labels, lv, le)} {_num(cumulative)}")
            out.append(f"{self.name}_sum{_labels(self.labels, lv)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labels, lv)} {_num(s[-1])}")
        return out


class Registry:
    """What /metrics shows, in registration order."""

    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric):  # noqa: ANN001, ANN201 - returns what it is given
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


class ServerMetrics:
    """The request-level series every server has; the batcher adds its own to the same registry."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.requests = self.registry.add(
            Counter(
                "lipkit_requests_total", "HTTP requests answered, by route and status.", ("route", "status")
            )
        )
        self.latency = self.registry.add(
            Histogram(
                "lipkit_request_duration_seconds",
                "Time from the request's arrival to the end of its response, by route.",
                LATENCY_BUCKETS,
                ("route",),
            )
        )


def route_label(scope: Scope, router: Any = None) -> str:
    """The matched route's path template (bounded label values), also for requests refused before
    routing (401, 429, 413), found by matching the router's routes; `other` for unknown paths."""
    route = scope.get("route")
    if route is None and router is not None:
        route = next((r for r in router.routes if r.matches(scope)[0] == Match.FULL), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request (refusals included) into `metrics`."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, router: Any = None) -> None:
        self.app, self.metrics, self.router = app, metrics, router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_label(scope, self.router)
            self.metrics.requests.inc(route, str(status))
            self.metrics.latency.observe(time.perf_counter() - t0, route)
