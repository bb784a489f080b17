"""conftest.free_port: the port stays reserved (nobody else can take it) while a server that sets
SO_REUSEADDR, as TCPStore and uvicorn do, still binds and listens on it."""

import errno
import socket

import pytest

from conftest import free_port


def test_free_port_is_reserved_for_the_server_that_asks_for_it():
    port = free_port()
    with socket.socket() as other, pytest.raises(OSError) as e:
        other.bind(("127.0.0.1", port))  # a process that does not opt into address reuse: refused
    assert e.value.errno == errno.EADDRINUSE
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    assert free_port() != port
