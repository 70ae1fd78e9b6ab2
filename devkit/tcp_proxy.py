"""A small TCP proxy (threads) that a test or a bench puts between an IMAP client and a server.

A mailbox registered with the proxy's port instead of Dovecot's has all its traffic go through
here, where it can be broken and counted.

Faults: the proxy forwards bytes until told to misbehave:

- :meth:`TcpProxy.cut_after` drops every link (TCP reset) once the server has sent N more bytes,
  counted over all links: with N inside the size of a FETCH response, the cut lands mid-FETCH;
- :meth:`TcpProxy.cut` drops every link now;
- :meth:`TcpProxy.pause_after` stops forwarding the server's bytes on the links open at that
  moment once N more bytes went through (the client blocks in its read, as behind a stalled
  network), :meth:`TcpProxy.resume` lets them flow again. Links opened later flow normally.

Latency: ``TcpProxy(host, port, latency=0.025)`` holds every chunk, each way, for that one-way
delay before forwarding it (a 50 ms round trip, as to a mail provider across a country), without
limiting throughput: chunks queue with their due time and flow in order, as on a long fat pipe.
``latency`` can also be changed while links are open.

Cuts and pauses count the server-to-client direction only: it is where a large response
(FETCH BODY[]) is, and so where a cut hurts.

Counting: every IMAP command a client sends is recorded (:attr:`TcpProxy.commands`), with the
bytes each way and each session's open and close times; :meth:`TcpProxy.take` hands them over
and starts afresh. That is how a test proves that a sync costs what changed (DESIGN invariant 6)
and how ``bench/resync.py`` shows where a re-sync's time goes. Credentials are never recorded:
LOGIN and AUTHENTICATE keep only their name, SASL responses are not commands, and the bytes of a
literal (RFC 3501 4.3, RFC 7888 ``{n+}``) are skipped unread. A link whose first byte is a TLS
handshake (implicit TLS) or that sent STARTTLS is counted in bytes only.
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple

_CHUNK = 16 * 1024
# "tag COMMAND" at the start of a client line (RFC 3501 9: a tag is any
# ASTRING-CHAR but "+", then SP and the command's name).
# A SASL response (base64, RFC 4959) or IDLE's DONE has no space, so it never matches.
_COMMAND = re.compile(rb'^([^\x00-\x20\x7f(){%*"\\+]+) ([A-Za-z][A-Za-z0-9.-]*)')
# A literal announced at the end of a line: {n}, {n+} (RFC 7888) or ~{n} (RFC 3516).
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
_SECRET_ARGUMENTS = frozenset({"LOGIN", "AUTHENTICATE"})
_TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a ClientHello


class Command(NamedTuple):
    """One command a client sent: when, and its line without the tag (``UID FETCH 1:9 (FLAGS)``).

    Only the first line of a command is kept (a literal's bytes and what follows them are not).
    """

    at: float  # time.monotonic() when the line was complete
    text: str

    @property
    def verb(self) -> str:
        """``SELECT``, ``UID FETCH``: what a test asserts on, whatever the arguments."""
        words = self.text.split(maxsplit=2)
        if words[0].upper() == "UID" and len(words) > 1:
            return f"UID {words[1].upper()}"
        return words[0].upper()


@dataclass
class Traffic:
    """What went through the proxy between two :meth:`TcpProxy.take` calls."""

    commands: list[Command] = field(default_factory=list)
    sessions: list[tuple[float, float]] = field(default_factory=list)  # (accepted, closed)
    bytes_up: int = 0  # client to server
    bytes_down: int = 0  # server to client

    @property
    def verbs(self) -> list[str]:
        return [command.verb for command in self.commands]


class _CommandReader:
    """Splits one link's client bytes into command lines; skips literals byte for byte."""

    def __init__(self) -> None:
        self._buffer = b""
        self._literal = 0  # bytes of a literal still to skip
        self._continuation = False  # the next line continues a command after its literal
        self._started = False
        self.opaque = False  # TLS: nothing more to read

    def feed(self, data: bytes) -> list[str]:
        if self.opaque:
            return []
        if not self._started:
            self._started = True
            if data[:1] == bytes([_TLS_HANDSHAKE]):
                self.opaque = True
                return []
        lines: list[str] = []
        self._buffer += data
        while self._buffer and not self.opaque:
            if self._literal:
                skipped = min(self._literal, len(self._buffer))
                self._buffer, self._literal = self._buffer[skipped:], self._literal - skipped
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1:]
            if not self._continuation and (text := _command_text(line)) is not None:
                lines.append(text)
                if text.upper() == "STARTTLS":
                    self.opaque, self._buffer = True, b""
            found = _LITERAL.search(line)
            self._literal, self._continuation = (int(found.group(1)), True) if found else (0, False)
        return lines


def _command_text(line: bytes) -> str | None:
    """The line without its tag, or None when it is no command; credentials replaced."""
    match = _COMMAND.match(line)
    if match is None:
        return None
    name = match.group(2).decode().upper()
    if name in _SECRET_ARGUMENTS:
        return f"{name} ***"
    return line[len(match.group(1)) + 1:].decode(errors="replace")


class _Delayed:
    """Forwards chunks to ``sock`` ``latency()`` seconds after they were handed over, in order.

    A thread of its own, so that a chunk waiting out its delay never holds back the reading of the
    next one: the delay adds to each chunk's time, not to the link's throughput.
    """

    def __init__(self, sock: socket.socket, latency: Callable[[], float]) -> None:
        self._sock = sock
        self._latency = latency
        self._queue: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def sendall(self, data: bytes) -> None:
        delay = self._latency()
        if delay <= 0 and self._thread is None:
            self._sock.sendall(data)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="proxy-delay", daemon=True)
            self._thread.start()
        self._queue.put((time.monotonic() + delay, data))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued chunk is sent (before a shutdown that must come after them)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        broken = False
        while (item := self._queue.get()) is not None:
            due, data = item
            time.sleep(max(0.0, due - time.monotonic()))
            if not broken:
                try:
                    self._sock.sendall(data)
                except OSError:  # the link was dropped: the rest has nowhere to go
                    broken = True


class _Link:
    def __init__(self, client: socket.socket, server: socket.socket,
                 latency: Callable[[], float] = lambda: 0.0) -> None:
        self.client = client
        self.server = server
        self.to_client = _Delayed(client, latency)
        self.to_server = _Delayed(server, latency)
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.accepted_at = time.monotonic()
        self.pumps = 2  # pumps still running; the last one out closes the link
        self.reader = _CommandReader()

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

    def __init__(self, target_host: str, target_port: int, latency: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.latency = latency  # seconds each chunk is held, each way (round trip: twice this)
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
        self._traffic = Traffic()
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
        with contextlib.suppress(OSError):  # wakes the accept() that a close alone leaves blocked
            self._listener.shutdown(socket.SHUT_RDWR)
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

    # -- counting -------------------------------------------------------------------------------

    @property
    def commands(self) -> list[Command]:
        """The commands recorded since the last :meth:`take` or :meth:`reset` (a copy)."""
        with self._lock:
            return list(self._traffic.commands)

    def take(self, settle: float = 5.0) -> Traffic:
        """What was recorded since the last take, once the open links closed, and reset.

        Waits up to ``settle`` seconds for the links to close, so that a session's last
        command (LOGOUT) and its close time are in; a link still open after that (a client
        that keeps its connection) is counted in the next take.
        """
        deadline = time.monotonic() + settle
        while self.open_links() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            taken, self._traffic = self._traffic, Traffic()
        return taken

    def reset(self) -> None:
        """Forget what was recorded so far (links stay open)."""
        with self._lock:
            self._traffic = Traffic()

    def _record(self, link: _Link, data: bytes) -> None:
        texts = link.reader.feed(data)
        now = time.monotonic()
        with self._lock:
            self._traffic.bytes_up += len(data)
            self._traffic.commands.extend(Command(now, text) for text in texts)

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
            link = _Link(client, server, lambda: self.latency)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            threading.Thread(target=self._pump_up, args=(link,), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(link,), daemon=True).start()

    def _pump_up(self, link: _Link) -> None:
        """Client to server: forwarded as it comes, and read for commands."""
        try:
            while True:
                data = link.client.recv(_CHUNK)
                if not data:
                    break
                # ACK at once, as Dovecot's end does: imapclient sends a command and its CRLF in
                # two writes, and without this the CRLF waits for our delayed ACK (Nagle), adding
                # 40 ms to ENABLE and UID SEARCH that a direct connection does not pay.
                with contextlib.suppress(OSError):
                    link.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                link.to_server.sendall(data)
                self._record(link, data)
        except OSError:
            pass
        link.to_server.flush()
        with contextlib.suppress(OSError):
            link.server.shutdown(socket.SHUT_WR)
        self._pump_done(link)

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
                    link.to_client.sendall(send)
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
                        link.to_client.sendall(rest)
        except OSError:
            pass
        finally:
            link.to_client.flush()
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)
            self._pump_done(link)

    def _pump_done(self, link: _Link) -> None:
        """The second pump to end closes the link and records its session."""
        with self._lock:
            link.pumps -= 1
            if link.pumps:
                return
            self._traffic.sessions.append((link.accepted_at, time.monotonic()))
            if link in self._links:
                self._links.remove(link)
        if not link.closed.is_set():
            link.closed.set()
            for sock in (link.client, link.server):
                with contextlib.suppress(OSError):
                    sock.close()

    def _account(self, data: bytes) -> tuple[bytes, str | None]:
        """How much of ``data`` to forward now, and whether a cut or pause falls inside it."""
        with self._lock:
            self._traffic.bytes_down += len(data)
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
