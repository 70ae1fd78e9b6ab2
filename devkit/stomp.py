"""A minimal STOMP 1.2 client for tests, over a plain socket (RabbitMQ's STOMP plugin, port 61613)
or a WebSocket (Web-STOMP, port 15674, what a browser uses).

Just enough to play a person's browser or someone trying to read another person's notifications:
CONNECT, SUBSCRIBE with a receipt, read MESSAGE frames. Every read has a deadline. Frames follow
STOMP 1.2 (https://stomp.github.io/stomp-specification-1.2.html): a command line, header lines,
a blank line, the body, then NUL; a lone end-of-line between frames is a heart-beat.
"""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType

import websocket

STOMP_PORT = 61613
WEB_STOMP_PORT = 15674
TRANSPORTS = ("stomp", "web-stomp")


@dataclass(frozen=True)
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""


def _encode(command: str, headers: dict[str, str]) -> bytes:
    # STOMP 1.2 escapes ":" "\n" "\r" "\\" in header values (section "Value Encoding") except in
    # CONNECT; the values used here hold none of them.
    lines = [command, *(f"{key}:{value}" for key, value in headers.items()), "", ""]
    return "\n".join(lines).encode() + b"\0"


def _decode(raw: bytes) -> Frame:
    head, _, body = raw.partition(b"\n\n")
    command, *lines = head.decode().split("\n")
    headers: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        headers.setdefault(key, value)  # 1.2: the first occurrence of a repeated header wins
    return Frame(command, headers, body.decode())


class StompClient:
    """One STOMP connection for one RabbitMQ user in one vhost."""

    def __init__(self, transport: str, vhost: str, login: str, passcode: str,
                 timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._buffer = b""
        self._ids = itertools.count()
        self.closed: str | None = None  # why the broker closed the connection, once it has
        self._sock: socket.socket | None = None
        self._ws: websocket.WebSocket | None = None
        if transport == "stomp":
            self._sock = socket.create_connection(("127.0.0.1", STOMP_PORT), timeout=timeout)
        elif transport == "web-stomp":
            self._ws = websocket.create_connection(f"ws://127.0.0.1:{WEB_STOMP_PORT}/ws",
                                                   timeout=timeout)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        self._send("CONNECT", {"accept-version": "1.2", "host": vhost, "login": login,
                               "passcode": passcode, "heart-beat": "0,0"})
        answer = self.read(timeout)
        if answer is None or answer.command != "CONNECTED":
            self.close()
            raise ConnectionError(f"STOMP CONNECT answered {answer}")

    def __enter__(self) -> StompClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def subscribe(self, destination: str, **headers: str) -> Frame:
        """SUBSCRIBE with a receipt; the answer is RECEIPT, or ERROR after which RabbitMQ closes
        the connection, or ``CLOSED``: RabbitMQ 3.10's Web-STOMP closes the WebSocket ("STOMP
        died") without sending the ERROR frame, and logs the reason. Extra headers use ``_`` for
        ``-``: ``x_queue_name="user-42-tab"``."""
        receipt = f"sub-{next(self._ids)}"
        self._send("SUBSCRIBE", {"id": receipt, "destination": destination, "ack": "auto",
                                 "receipt": receipt,
                                 **{key.replace("_", "-"): value for key, value in headers.items()}})
        answer = self.read(self.timeout)
        if answer is None and self.closed is not None:
            return Frame("CLOSED", {"message": self.closed})
        if answer is None:
            raise TimeoutError(f"no answer to SUBSCRIBE {destination} within {self.timeout} s")
        return answer

    def read(self, timeout: float) -> Frame | None:
        """The next frame, or None if none came within ``timeout`` seconds or the connection was
        closed."""
        deadline = time.monotonic() + timeout
        while True:
            self._buffer = self._buffer.lstrip(b"\r\n")  # heart-beats
            raw, nul, rest = self._buffer.partition(b"\0")
            if nul:
                self._buffer = rest
                return _decode(raw)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            chunk = self._receive(left)
            if not chunk:
                return None
            self._buffer += chunk

    def messages(self, count: int, timeout: float) -> list[Frame]:
        """Up to ``count`` MESSAGE frames, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        received: list[Frame] = []
        while len(received) < count:
            frame = self.read(max(deadline - time.monotonic(), 0.0))
            if frame is None:
                break
            if frame.command == "MESSAGE":
                received.append(frame)
        return received

    def disconnect(self) -> None:
        """DISCONNECT with a receipt, so the broker has let go of the subscriptions on return."""
        self._send("DISCONNECT", {"receipt": "bye"})
        self.read(self.timeout)
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._ws is not None:
            self._ws.close()

    def _send(self, command: str, headers: dict[str, str]) -> None:
        data = _encode(command, headers)
        if self._ws is not None:
            self._ws.send(data.decode())
        else:
            assert self._sock is not None
            self._sock.sendall(data)

    def _receive(self, timeout: float) -> bytes:
        try:
            if self._ws is not None:
                self._ws.settimeout(timeout)
                opcode, frame = self._ws.recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    # RFC 6455 5.5.1: a two-byte status code, then the reason.
                    self.closed = frame.data[2:].decode(errors="replace")
                    return b""
                return bytes(frame.data)
            assert self._sock is not None
            self._sock.settimeout(timeout)
            data = self._sock.recv(65536)
            if not data:
                self.closed = "connection closed"
            return data
        # A timeout and a closed connection both end the wait: nothing more came.
        except (TimeoutError, websocket.WebSocketTimeoutException):
            return b""
        except (OSError, websocket.WebSocketConnectionClosedException) as exc:
            self.closed = self.closed or str(exc)
            return b""
