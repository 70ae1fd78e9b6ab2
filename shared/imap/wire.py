"""The IMAP wire: the one module that touches imapclient's and imaplib's internals.

A server is untrusted input (its host is typed in by users), so every byte it sends is read here,
through :class:`BoundedIMAP4`, against limits that hold on the bytes actually received, never on
the sizes the server declares:

- a deadline per command (``command_timeout``), and an optional wall-clock deadline for the whole
  attempt: a server that drips one byte every few seconds is cut at the deadline, however often
  bytes arrive (a socket timeout alone restarts at every byte);
- a cap on one response line (imaplib's own is 1,000,000 bytes, too small for a real SEARCH
  answer and too large for a LIST line);
- a cap on the bytes one command's answer may keep in memory (an endless LIST ends there);
- a literal larger than ``max_literal_bytes`` is read in chunks and thrown away, and stands in the
  response as a :class:`SkippedLiteral`, whatever RFC822.SIZE claimed.

After any of these the connection is closed: the protocol state is unknown (RFC 3501 section 5.5
gives no way to abandon a command in flight).

The commands imapclient cannot send as needed also live here: UID FETCH and UID SEARCH over
compressed UID sets, SEARCH with literals, ESEARCH (RFC 4731), VANISHED (RFC 7162 section 3.2.10),
and AUTHENTICATE with an initial response (SASL-IR, RFC 4959).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from imapclient import IMAPClient
from imapclient.imapclient import SocketTimeout, seq_to_parenstr_upper
from imapclient.response_parser import parse_fetch_response, parse_message_list

from mailferry.errors import ImapLimitExceeded, ImapProtocolError, ImapTimeout
from mailferry.imap.address import Target, connect

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Limits:
    """What one server may cost: time and memory, counted on what it actually sends."""

    read_timeout: float = 60.0  # silence allowed between two reads
    command_timeout: float = 300.0  # one command, from sending it to its tagged answer
    max_line_bytes: int = 8 * 1024 * 1024  # one response line (without its literals)
    max_response_bytes: int = 96 * 1024 * 1024  # kept in memory for one command's answer
    max_literal_bytes: int = 64 * 1024 * 1024  # larger literals are read and dropped


class SkippedLiteral(bytes):
    """A literal that was larger than the limit: read and discarded. Its ``len()`` is the size
    the server sent (so imapclient's parser accepts it); it holds no bytes."""

    size: int

    def __new__(cls, size: int) -> SkippedLiteral:
        obj = super().__new__(cls, b"")
        obj.size = size
        return obj

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<SkippedLiteral of {self.size} bytes>"


@dataclass(frozen=True)
class ImapLiteral:
    """Bytes that must go as an IMAP literal: the server reads them by count, not by syntax."""

    data: bytes


class BoundedIMAP4(imaplib.IMAP4):
    """imaplib's protocol engine, reading through deadline- and size-bounded buffers, connected
    to exactly the addresses that were checked (``targets``), TLS verified against ``host``."""

    def __init__(self, host: str, port: int, *, targets: Sequence[Target], limits: Limits,
                 tls: ssl.SSLContext | None, connect_timeout: float, where: str) -> None:
        self._targets = tuple(targets)
        self._limits = limits
        self._tls = tls
        self._where = where
        self._buffer = bytearray()
        self._command_deadline = time.monotonic() + limits.command_timeout  # the greeting
        self._received = 0
        self.attempt_deadline: float | None = None
        self.broken: str | None = None
        super().__init__(host, port, timeout=connect_timeout)

    # --- connecting ------------------------------------------------------------------------

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = connect(self._targets, timeout or self._limits.read_timeout)
        if self._tls is None:
            return sock
        try:
            return self._handshake(sock, self._tls)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """TLS over ``sock``, within the command's deadline however slowly the server answers
        (a handshake with a timeout is bounded in total, not per byte: CPython's ``_ssl``)."""
        tls = context.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        remaining = self._deadline() - time.monotonic()
        if remaining <= 0:
            self._timed_out()
        tls.settimeout(min(self._limits.read_timeout, remaining))
        try:
            tls.do_handshake()
        except TimeoutError:
            self.sock = tls  # what _fail closes
            self._timed_out()
        return tls

    def open(self, host: str = "", port: int = 143, timeout: float | None = None) -> None:
        self.host = host
        self.port = port
        self.sock = self._create_socket(timeout)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _get_capabilities(self) -> None:
        # The greeting's [CAPABILITY ...] code (RFC 3501 section 7.1) saves a round trip.
        if self.untagged_responses.get("CAPABILITY"):
            dat = cast(bytes, self.untagged_responses.pop("CAPABILITY")[-1])
            self.capabilities = tuple(dat.decode("ascii", "replace").upper().split())
            return
        super()._get_capabilities()  # type: ignore[misc]

    def starttls(  # type: ignore[override]
            self, ssl_context: ssl.SSLContext | None = None) -> tuple[str, list[Any]]:
        """imaplib's STARTTLS, refusing bytes the server sent after its OK in clear text: they
        would be read as if they came over TLS (response injection, CVE-2011-0411's kind)."""
        if ssl_context is None:
            raise ValueError("STARTTLS needs a verifying TLS context")
        typ, dat = self._simple_command("STARTTLS")
        if typ != "OK":
            raise self.error(f"STARTTLS refused: {dat}")
        if self._buffer:
            self._fail(ImapProtocolError(f"{self._where}: data sent in clear text after STARTTLS"))
        self.sock = self._handshake(self.sock, ssl_context)
        self._tls_established = True
        self.untagged_responses.pop("CAPABILITY", None)  # pre-TLS capabilities are not trusted
        super()._get_capabilities()  # type: ignore[misc]
        return typ, dat

    # --- reading, bounded ------------------------------------------------------------------

    def send(self, data: bytes) -> None:  # type: ignore[override]
        if data.startswith(cast(bytes, self.tagpre)):  # a new command (not a literal or a SASL response)
            self._command_deadline = time.monotonic() + self._limits.command_timeout
            self._received = 0
        self._check_deadline()
        try:
            self.sock.settimeout(self._limits.read_timeout)
            self.sock.sendall(data)
        except OSError as exc:
            raise self.abort(f"socket error: {exc}") from exc

    def readline(self) -> bytes:
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end >= self._limits.max_line_bytes or (
                    end < 0 and len(self._buffer) > self._limits.max_line_bytes):
                self._fail(ImapLimitExceeded(
                    f"{self._where}: a response line longer than {self._limits.max_line_bytes} "
                    "bytes"))
            if end >= 0:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                self._count(len(line))
                return line
            start = len(self._buffer)
            if not self._receive():
                line = bytes(self._buffer)  # EOF: imaplib reports the unterminated line
                self._buffer.clear()
                bye = self.untagged_responses.get("BYE")
                if not line and bye and self.state != "LOGOUT":
                    # The server said why it hung up (an expired OAuth2 token, a shutdown):
                    # imaplib would report only "EOF".
                    last = bye[-1]
                    said = last.decode("utf-8", "replace") if isinstance(last, bytes) else ""
                    raise self.abort(f"server said BYE: {said}")
                return line

    def read(self, size: int) -> bytes:
        if size > self._limits.max_literal_bytes:
            self._discard(size)
            return SkippedLiteral(size)
        self._count(size)
        out = bytearray(size)
        view = memoryview(out)
        have = min(size, len(self._buffer))
        view[:have] = self._buffer[:have]
        del self._buffer[:have]
        while have < size:
            self._settimeout()
            try:
                got = self.sock.recv_into(view[have:], min(size - have, _CHUNK))
            except TimeoutError:
                self._timed_out()
            except OSError as exc:
                raise self.abort(f"socket error: {exc}") from exc
            if not got:
                raise self.abort(f"socket error: EOF in a literal ({have} of {size} bytes)")
            have += got
        view.release()
        return bytes(out)

    def _discard(self, size: int) -> None:
        left = size
        take = min(left, len(self._buffer))
        del self._buffer[:take]
        left -= take
        while left:
            self._settimeout()
            try:
                got = len(self.sock.recv(min(left, _CHUNK)))
            except TimeoutError:
                self._timed_out()
            except OSError as exc:
                raise self.abort(f"socket error: {exc}") from exc
            if not got:
                raise self.abort("socket error: EOF in a literal")
            left -= got

    def _receive(self) -> bool:
        self._settimeout()
        try:
            chunk = self.sock.recv(_CHUNK)
        except TimeoutError:
            self._timed_out()
        except OSError as exc:
            raise self.abort(f"socket error: {exc}") from exc
        self._buffer += chunk
        return bool(chunk)

    def _deadline(self) -> float:
        if self.attempt_deadline is None:
            return self._command_deadline
        return min(self._command_deadline, self.attempt_deadline)

    def _check_deadline(self) -> None:
        if time.monotonic() >= self._deadline():
            self._timed_out()

    def _settimeout(self) -> None:
        remaining = self._deadline() - time.monotonic()
        if remaining <= 0:
            self._timed_out()
        self.sock.settimeout(min(self._limits.read_timeout, remaining))

    def _timed_out(self) -> Any:
        now = time.monotonic()
        if self.attempt_deadline is not None and now >= self.attempt_deadline:
            what = "the sync attempt's deadline passed"
        elif now >= self._command_deadline:
            what = f"no complete answer within {self._limits.command_timeout:g}s"
        else:
            what = f"no data for {self._limits.read_timeout:g}s"
        self._fail(ImapTimeout(f"{self._where}: {what}"))

    def _count(self, size: int) -> None:
        self._received += size
        if self._received > self._limits.max_response_bytes:
            self._fail(ImapLimitExceeded(
                f"{self._where}: the answer to one command exceeded "
                f"{self._limits.max_response_bytes} bytes"))

    def _fail(self, exc: Exception) -> Any:
        self.broken = str(exc)
        self._buffer.clear()
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: not connected yet
            self.shutdown()
        raise exc


class Client(IMAPClient):  # type: ignore[misc]
    """imapclient on :class:`BoundedIMAP4`."""

    def __init__(self, host: str, port: int, *, targets: Sequence[Target], limits: Limits,
                 tls: ssl.SSLContext | None, connect_timeout: float, where: str) -> None:
        self._bounded = dict(targets=targets, limits=limits, tls=tls,
                             connect_timeout=connect_timeout, where=where)
        super().__init__(host, port, ssl=False,
                         timeout=SocketTimeout(connect=connect_timeout, read=limits.read_timeout))
        self.normalise_times = False  # keep INTERNALDATE's zone
        # imapclient turns imaplib's protocol trace on (debug 5, sent to a DEBUG logger), and
        # imaplib formats every line and literal with %r before the logger can say no: 40% of
        # the fetcher's CPU in a first sync (issue 11), and mail bodies in a log if DEBUG
        # were ever enabled. Mailferry logs its own structured lines instead.
        self._imap.debug = 0
        self.folder_encode = False  # raw (modified UTF-7) names; decoded by the folders module

    def _create_IMAP4(self) -> BoundedIMAP4:
        return BoundedIMAP4(self.host, self.port, **self._bounded)  # type: ignore[arg-type]


def engine(client: IMAPClient) -> BoundedIMAP4:
    imap = client._imap
    assert isinstance(imap, BoundedIMAP4), "connections are opened by shared.imap.connection"
    return imap


def set_attempt_deadline(client: IMAPClient, deadline: float | None) -> None:
    engine(client).attempt_deadline = deadline


def broken(client: IMAPClient) -> str | None:
    """Why the connection was closed under a limit, or None while it is usable."""
    return engine(client).broken


def bye(client: IMAPClient) -> str | None:
    """The text of an untagged BYE the server sent before closing, if one was read: a lost
    connection's reason (imaplib keeps it aside and reports only the EOF that follows)."""
    said = engine(client).untagged_responses.get("BYE")
    if not said:
        return None
    last = said[-1]
    return last.decode("utf-8", "replace") if isinstance(last, bytes) else str(last)


# --- UID sets -----------------------------------------------------------------------------------


def uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into an IMAP sequence set (RFC 3501 section 9): [1,2,3,7] -> '1:3,7'."""
    runs: list[list[int]] = []
    for uid in sorted(set(uids)):
        if runs and uid == runs[-1][1] + 1:
            runs[-1][1] = uid
        else:
            runs.append([uid, uid])
    return ",".join(f"{a}:{b}" if a != b else str(a) for a, b in runs)


def parse_uid_ranges(text: str) -> list[tuple[int, int]]:
    """'1:3,7,9:8' -> [(1, 3), (7, 7), (8, 9)]; what is not a number is ignored."""
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        low, _, high = part.strip().partition(":")
        if low.isdigit():
            a, b = int(low), int(high) if high.isdigit() else int(low)
            out.append((min(a, b), max(a, b)))
    return out


# --- commands imapclient cannot send as needed ----------------------------------------------------


def uid_fetch(client: IMAPClient, message_set: str, items: Sequence[str],
              modifiers: Sequence[str] = (),
              wanted: Callable[[int], bool] | None = None) -> dict[int, dict[bytes, Any]]:
    """UID FETCH over a compressed set, keeping only the UIDs ``wanted`` (RFC 3501 7.4.2 allows
    unsolicited FETCH responses). ``IMAPClient.fetch`` sends every UID separately."""
    imap = engine(client)
    args = ["UID", "FETCH", message_set, seq_to_parenstr_upper(list(items))]
    if modifiers:
        args.append(seq_to_parenstr_upper(list(modifiers)))
    tag = imap._command(*args)
    typ, data = imap._command_complete("FETCH", tag)
    client._checkok("fetch", typ, data)
    typ, data = imap._untagged_response(typ, data, "FETCH")
    response = parse_fetch_response(data, client.normalise_times, True)
    return {uid: values for uid, values in response.items() if wanted is None or wanted(uid)}


def uid_search(client: IMAPClient, pieces: Sequence[bytes | ImapLiteral], charset: str | None,
               where: str, *, esearch: bool = False) -> list[int]:
    """``UID SEARCH`` written by hand, its literals sent as literals (``IMAPClient.search`` sends
    a CR or LF inside a quoted string, which splits the command). With LITERAL+ (RFC 7888) a
    literal goes as ``{n+}`` at once, otherwise ``{n}`` waits for the server's ``+`` (RFC 3501
    7.5). With ``esearch`` the answer is one ``* ESEARCH ... UID ALL 1:5,9`` line of ranges
    (RFC 4731), far shorter than SEARCH's list of every UID."""
    literal_plus = client.has_capability("LITERAL+")  # may send CAPABILITY: not mid-command
    imap = engine(client)
    tag: bytes = imap._new_tag()
    line = tag + b" UID SEARCH " + (b"RETURN (ALL) " if esearch else b"")
    line += f"CHARSET {charset} ".encode() if charset else b""
    for piece in pieces:
        if not isinstance(piece, ImapLiteral):
            line += piece
            continue
        size = str(len(piece.data)).encode("ascii")
        if literal_plus:
            line += b"{" + size + b"+}\r\n" + piece.data
            continue
        imap.send(line + b"{" + size + b"}\r\n")
        while imap._get_response() is not None:  # None: the "+" continuation
            done = imap.tagged_commands.get(tag)
            if done:
                imap.tagged_commands.pop(tag, None)
                raise ImapProtocolError(f"{where}: search refused: {_response_text(done)}")
        line = piece.data
    imap.send(line + b"\r\n")
    typ, data = imap._command_complete("SEARCH", tag)
    if typ != "OK":
        text = _response_text((typ, data))
        if "[BADCHARSET" in text.upper():
            raise ImapProtocolError(
                f"{where}: the server cannot search in {charset or 'US-ASCII'}"
                f" (non-ASCII search values need CHARSET UTF-8): {text}")
        raise ImapProtocolError(f"{where}: search refused: {text}")
    if esearch:
        found: list[int] = []
        for raw in imap.untagged_responses.pop("ESEARCH", []):
            for low, high in _esearch_all(raw if isinstance(raw, bytes) else b""):
                found.extend(range(low, high + 1))
        imap.untagged_responses.pop("SEARCH", None)
        return found
    typ, data = imap._untagged_response(typ, data, "SEARCH")
    return [int(uid) for uid in parse_message_list(data)]


_ESEARCH_ALL = re.compile(rb"\bALL\s+([0-9:,]+)", re.IGNORECASE)


def _esearch_all(line: bytes) -> list[tuple[int, int]]:
    """The ``ALL`` ranges of an ESEARCH response: ``(TAG "A1") UID ALL 1:3,7`` (RFC 4731 3.1)."""
    match = _ESEARCH_ALL.search(line)
    return parse_uid_ranges(match.group(1).decode("ascii")) if match else []


def fetch_sequence(client: IMAPClient, message_set: str,
                   items: Sequence[str]) -> dict[int, dict[bytes, Any]]:
    """FETCH by message sequence numbers (``n:*``: the newest messages), keyed by sequence."""
    imap = engine(client)
    tag = imap._command("FETCH", message_set, seq_to_parenstr_upper(list(items)))
    typ, data = imap._command_complete("FETCH", tag)
    client._checkok("fetch", typ, data)
    typ, data = imap._untagged_response(typ, data, "FETCH")
    return dict(parse_fetch_response(data, client.normalise_times, False))


def pop_vanished(client: IMAPClient) -> list[tuple[int, int]]:
    """UID ranges the server reported as VANISHED since the last call (RFC 7162 3.2.10)."""
    ranges: list[tuple[int, int]] = []
    for data in engine(client).untagged_responses.pop("VANISHED", []):
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)
        ranges.extend(parse_uid_ranges(re.sub(r"\(EARLIER\)", "", text, flags=re.I)))
    return ranges


def authenticate(client: IMAPClient, mechanism: str, initial: bytes, *,
                 abort: bytes = b"") -> None:
    """AUTHENTICATE with a one-step mechanism (PLAIN, XOAUTH2, OAUTHBEARER). With SASL-IR
    (RFC 4959) the initial response rides on the command line; otherwise it answers the server's
    empty ``+`` challenge (RFC 3501 6.2.2). A challenge after the initial response is an error
    report (XOAUTH2, OAUTHBEARER): it is answered with ``abort`` (empty; %x01 for OAUTHBEARER,
    RFC 7628 3.2.3) and the server then says NO. A refusal raises imaplib's error."""
    imap = engine(client)
    if client.has_capability("SASL-IR"):
        encoded = base64.b64encode(initial).decode("ascii") if initial else "="
        imap.literal = imaplib._Authenticator(lambda _c: abort).process  # type: ignore[assignment]
        typ, dat = imap._simple_command("AUTHENTICATE", mechanism, encoded)
    else:
        sent = False

        def respond(_challenge: bytes) -> bytes:
            nonlocal sent
            answer = abort if sent else initial
            sent = True
            return answer

        imap.literal = imaplib._Authenticator(respond).process  # type: ignore[assignment]
        typ, dat = imap._simple_command("AUTHENTICATE", mechanism)
    if typ != "OK":
        raise imap.error(dat[-1].decode("utf-8", "replace") if dat and dat[-1] else typ)
    imap.state = "AUTH"


def _response_text(response: Any) -> str:
    typ, data = response
    parts = [d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d) for d in data or ()]
    return " ".join(f"{typ} {' '.join(parts)}".split())


# --- waiting for the server: IDLE (RFC 2177) and NOTIFY (RFC 5465) ------------------------------
#
# A watch spends hours reading nothing; the command deadline and the read timeout would cut it.
# So the wait for the *first* byte of an unsolicited response is bounded by the caller's own
# timeout (the next poll or renewal), and once a byte has come, the rest of that response is
# read under the ordinary limits: a fresh command deadline, the line cap, the literal cap. A
# server that drips a response or floods lines is cut or paced exactly as during a sync.

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r?\n$")
_BYE = re.compile(rb"^\* BYE\b ?", re.IGNORECASE)

#: One response as imaplib gives it: lines, and (line ending in a literal's size, literal) pairs.
Response = list[bytes | tuple[bytes, bytes]]


def interrupt(client: IMAPClient) -> None:
    """Wake a thread blocked reading ``client`` (from another thread): the read sees EOF."""
    with contextlib.suppress(OSError, AttributeError):
        engine(client).sock.shutdown(socket.SHUT_RDWR)


def send_tagged(client: IMAPClient, command: bytes) -> bytes:
    """Send ``<tag> <command>``; the tag to pass to :func:`read_until_tagged`."""
    imap = engine(client)
    tag = cast(bytes, imap._new_tag())
    imap.tagged_commands.pop(tag, None)  # read by us, not by imaplib: nothing to keep
    imap.send(tag + b" " + command + b"\r\n")
    return tag


def send_continuation(client: IMAPClient, line: bytes) -> None:
    """A line that is not a command (IDLE's ``DONE``): it starts its answer's deadline."""
    imap = engine(client)
    imap._command_deadline = time.monotonic() + imap._limits.command_timeout
    imap._received = 0
    imap.send(line + b"\r\n")


def read_response(client: IMAPClient) -> Response:
    """One whole response (its literals included), under the command's deadline and limits."""
    imap = engine(client)
    out: Response = []
    while True:
        line = imap.readline()
        if not line.endswith(b"\n"):
            raise imap.abort("socket error: EOF")
        match = _LITERAL.search(line)
        if match is None:
            out.append(line.rstrip(b"\r\n"))
            if len(out) == 1 and (bye := _BYE.match(line)):
                # Kept where imaplib keeps it: the EOF that follows says why (an expired
                # OAuth2 token, a shutdown), as it does for imaplib's own commands.
                imap.untagged_responses.setdefault("BYE", []).append(
                    line[bye.end():].rstrip(b"\r\n"))
            return out
        size = int(match.group(1))
        if size > imap._limits.max_line_bytes:  # names and short strings only, here
            imap._fail(ImapLimitExceeded(f"{imap._where}: a literal of {size} bytes in an "
                                         "unsolicited response"))
        out.append((line.rstrip(b"\r\n"), imap.read(size)))


def read_until_tagged(client: IMAPClient, tag: bytes) -> tuple[bytes, list[Response]]:
    """The untagged responses before the tagged answer to ``tag``, and its status (OK/NO/BAD)
    with its text. A continuation request is refused: none of these commands asks for one."""
    untagged: list[Response] = []
    while True:
        response = read_response(client)
        first = response[0] if isinstance(response[0], bytes) else response[0][0]
        if first.startswith(tag + b" "):
            return first[len(tag) + 1:], untagged
        if first.startswith(b"+"):
            raise ImapProtocolError(f"{engine(client)._where}: unexpected continuation")
        untagged.append(response)
        if len(untagged) > 100_000:
            engine(client)._fail(ImapLimitExceeded(
                f"{engine(client)._where}: over 100000 untagged responses to one command"))


def read_until_continuation(client: IMAPClient, tag: bytes) -> tuple[bytes | None, list[Response]]:
    """After IDLE: the untagged responses before the server's ``+``; (None, ...) once it came,
    (the tagged status, ...) if the server answered the command instead (refused it)."""
    untagged: list[Response] = []
    while True:
        response = read_response(client)
        first = response[0] if isinstance(response[0], bytes) else response[0][0]
        if first.startswith(b"+"):
            return None, untagged
        if first.startswith(tag + b" "):
            return first[len(tag) + 1:], untagged
        untagged.append(response)
        if len(untagged) > 100_000:
            engine(client)._fail(ImapLimitExceeded(
                f"{engine(client)._where}: over 100000 responses before IDLE's continuation"))


def wait_response(client: IMAPClient, timeout: float) -> Response | None:
    """The next unsolicited response, or None if nothing began to arrive within ``timeout``
    seconds. Once a byte arrived, the response is read under the ordinary limits."""
    imap = engine(client)
    if b"\n" not in imap._buffer:
        try:
            imap.sock.settimeout(max(timeout, 0.001))
            chunk = imap.sock.recv(_CHUNK)
        except TimeoutError:
            return None
        except OSError as exc:
            raise imap.abort(f"socket error: {exc}") from exc
        if not chunk:
            raise imap.abort("socket error: EOF")
        imap._buffer += chunk
    imap._command_deadline = time.monotonic() + imap._limits.command_timeout
    imap._received = 0
    return read_response(client)
