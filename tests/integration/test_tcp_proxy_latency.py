"""The test proxy's latency option: a round trip costs twice the one-way delay, a stream does not."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mailferry.devkit.tcp_proxy import TcpProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback server that sends back whatever it receives."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):  # the proxy ends its links with a reset
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(timeout=5)


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the link early"
        data += chunk
    return data


def test_a_round_trip_through_the_proxy_takes_twice_its_one_way_latency(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port, latency=0.025) as proxy, \
            socket.create_connection((proxy.host, proxy.port), timeout=5) as client:
        started = time.monotonic()
        client.sendall(b"ping")
        assert _receive(client, 4) == b"ping"
        assert time.monotonic() - started >= 0.05  # the delay is there, both ways


def test_chunks_sent_back_to_back_are_delayed_once_not_one_after_another(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port, latency=0.05) as proxy, \
            socket.create_connection((proxy.host, proxy.port), timeout=5) as client:
        started = time.monotonic()
        for n in range(20):
            client.sendall(b"%02d" % n)
            time.sleep(0.002)
        echoed = _receive(client, 40)
        elapsed = time.monotonic() - started
    assert echoed == b"".join(b"%02d" % n for n in range(20))
    # 2 x 50 ms and the sending; delayed one after another they would take over 2 s: the
    # bound only tells the two designs apart, it measures no speed
    assert 0.1 <= elapsed < 1.5
