"""A small TCP proxy (threads) that a test puts between a client and a server to break links.

The fault tests point a mailbox at the proxy instead of Dovecot; the proxy then forwards bytes
until told to misbehave:

- :meth:`TcpProxy.cut_after` drops every link (TCP reset) once the server has sent N more bytes,
  counted over all links: with N inside the size of a FETCH response, the cut lands mid-FETCH;
- :meth:`TcpProxy.cut` drops every link now;
- :meth:`TcpProxy.pause_after` stops forwarding the server's bytes on the links open at that
  moment once N more bytes went through (the client blocks in its read, as behind a stalled
  network), :meth:`TcpProxy.resume` lets them flow again. Links opened later flow normally.

Only the server-to-client direction is counted: it is where a large response (FETCH BODY[])
is, and so where a cut hurts.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

_CHUNK = 16 * 1024


class _Link:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()

    def drop(self) -> None:
        """Close both ends with a reset (SO_LINGER 0), as a broken network path looks."""
        if self.closed.is_set():
            return
        self.closed.set()
        self.flowing.set()  # wake a paused pump so that it sees the link is gone
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # A close alone would wait for the other pump blocked in recv() on the socket:
            # SHUT_RD wakes it, and the last close then sends the reset.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to ``target``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._counted = 0  # server bytes since the last cut_after/pause_after
        self._cut_at: int | None = None
        self._pause_at: int | None = None
        self.cuts = 0  # how many times the links were dropped
        self.accepted = 0  # connections accepted so far
        self.cut_done = threading.Event()
        self.paused = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut(count=False)
        self._thread.join(timeout=5)

    # -- faults ---------------------------------------------------------------------------------

    def cut_after(self, server_bytes: int) -> None:
        """Drop all links once the server has sent ``server_bytes`` more bytes (once)."""
        with self._lock:
            self._counted = 0
            self._cut_at = server_bytes
            self.cut_done.clear()

    def pause_after(self, server_bytes: int) -> None:
        """Hold the server's bytes on the open links once ``server_bytes`` more went through."""
        with self._lock:
            self._counted = 0
            self._pause_at = server_bytes
            self.paused.clear()

    def resume(self) -> None:
        """Let the held links flow again (a pause armed by ``pause_after`` stays armed)."""
        with self._lock:
            for link in self._links:
                link.flowing.set()
        self.paused.clear()

    def cut(self, count: bool = True) -> None:
        with self._lock:
            links, self._links = self._links, []
            if count and links:
                self.cuts += 1
        for link in links:
            link.drop()

    def open_links(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if not link.closed.is_set())

    # -- forwarding -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            threading.Thread(target=self._pump_up, args=(link,), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(link,), daemon=True).start()

    def _pump_up(self, link: _Link) -> None:
        """Client to server: forwarded as it comes."""
        try:
            while True:
                data = link.client.recv(_CHUNK)
                if not data:
                    break
                link.server.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            link.server.shutdown(socket.SHUT_WR)

    def _pump_down(self, link: _Link) -> None:
        """Server to client: counted, and where cuts and pauses happen."""
        try:
            while True:
                data = link.server.recv(_CHUNK)
                if not data:
                    break
                send, action = self._account(data)
                if send:
                    link.flowing.wait()
                    if link.closed.is_set():
                        return
                    link.client.sendall(send)
                if action == "cut":
                    self.cut()
                    self.cut_done.set()
                    return
                if action == "pause":
                    self._pause_links()
                    link.flowing.wait()
                    if link.closed.is_set():
                        return
                    rest = data[len(send):]
                    if rest:
                        link.client.sendall(rest)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            link.client.shutdown(socket.SHUT_WR)

    def _account(self, data: bytes) -> tuple[bytes, str | None]:
        """How much of ``data`` to forward now, and whether a cut or pause falls inside it."""
        with self._lock:
            before = self._counted
            self._counted += len(data)
            for limit, action in ((self._cut_at, "cut"), (self._pause_at, "pause")):
                if limit is not None and self._counted >= limit:
                    if action == "cut":
                        self._cut_at = None
                    else:
                        self._pause_at = None
                    return data[:max(0, limit - before)], action
        return data, None

    def _pause_links(self) -> None:
        with self._lock:
            for link in self._links:
                link.flowing.clear()
        self.paused.set()
