"""What the benchmarks that spawn gloo ranks share (bench_ring.py, bench_scaling.py)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free loopback port for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
