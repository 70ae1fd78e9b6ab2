"""A fake IMAP4rev1 server (RFC 3501) on 127.0.0.1 that can misbehave on purpose.

mailferry treats every IMAP server as untrusted input (DESIGN.md, invariant 9): users type in hosts,
so a sync must have bounded time and bounded memory whatever the server sends. Dovecot never
misbehaves, so the client's limits (deadline per command, cap on line length, cap on bytes per
command, cap on literal sizes whatever RFC822.SIZE declared, UID windows) need a server that does.

In ``healthy`` mode the fake speaks enough IMAP for a sync client: CAPABILITY, LOGIN, AUTHENTICATE
PLAIN (with or without the SASL-IR initial response, RFC 4959), AUTHENTICATE XOAUTH2 (with SASL-IR,
when ``AUTH=XOAUTH2`` is among its capabilities: the tokens given are kept in ``bearer_tokens``),
ENABLE, NAMESPACE, LIST/LSUB,
STATUS, SELECT/EXAMINE, SEARCH (ALL, UID <set>, <seq-set>, SINCE/BEFORE/ON, ANDed, and the ESEARCH
``RETURN (...)`` form of RFC 4731), FETCH (UID, FLAGS, INTERNALDATE, RFC822.SIZE, MODSEQ, BODY[],
BODY.PEEK[], partial ``<o.n>`` per RFC 3501 6.4.5, [HEADER], [TEXT]), NOOP, CLOSE, UNSELECT, LOGOUT.
Messages are generated from the UID on demand (:meth:`FolderSpec.message`), so a folder of a
million UIDs costs nothing until fetched. Every answer of unbounded size is streamed in chunks.

The misbehaviours (``behaviour=``), each of which kicks in only after a successful login, so that a
client reaches its sync part before the server turns on it:

- ``slow_drip``: models a server (or a middlebox) that keeps a connection alive by trickling. Any
  sync command (LIST, LSUB, STATUS, SELECT, EXAMINE, SEARCH, FETCH) is answered one byte every
  ``drip_interval`` seconds, the genuine untagged data first and then ``* OK still working`` lines
  forever, never the tagged completion. A per-read timeout never fires: only a deadline per
  command does.
- ``endless_list``: models a server with a broken or cyclic folder tree. LIST streams
  ``* LIST (\\HasNoChildren) "/" "folderN"`` lines as fast as the client reads, never the tagged
  OK. Only a cap on bytes (or lines) per command stops the client.
- ``lying_size``: models a server whose size metadata lies. FETCH says ``RFC822.SIZE 100``, but
  BODY[] is a literal of ``literal_bytes`` bytes (default 80 MiB): a valid RFC 822 message, headers
  then filler lines, generated in 64 KiB chunks and never held whole. A client that sizes its
  buffers by RFC822.SIZE, or trusts it as a cap, is caught.
- ``huge_folder``: models a real, large mailbox. INBOX holds ``huge_uids`` UIDs (default
  1,000,000), and a whole-range SEARCH is answered truthfully in one enormous line (about 7 MB
  for a million UIDs), as Dovecot would. A client must ask in UID windows.
- ``garbage_literal``: models a hostile or corrupted server. FETCH is answered with a literal of
  ``{99999999999}`` (about 93 GiB) followed by random bytes until the client leaves.
- ``disconnect_mid_literal``: models a crash or a cut link. FETCH with a body item announces the
  literal (the real message, or ``literal_bytes`` of generated message when given), sends half
  of it and closes the socket.
- ``bye_mid_command``: models a server shutting down. The first SELECT, EXAMINE or FETCH
  (``bye_commands``; ``bye_times`` of them in total, over all connections, so a retrying client
  can succeed after that, and after ``bye_skip`` of them answered as usual) is answered
  ``* BYE server shutting down`` (``bye_text``: e.g. Microsoft's ``Session invalidated -
  AccessTokenExpired``) and the connection closes.
- ``idle_drip``: models a watched server that turns on its watcher. IDLE (RFC 2177) is answered
  with its ``+`` continuation, then an untagged response dripped one byte every
  ``drip_interval`` seconds, forever: a client that waits for it without a deadline on the
  response (only on the first byte) is stalled for good. (In other modes IDLE is refused.)
- ``long_line``: models a server that never ends a line. The first sync command is answered with
  one untagged line of ``long_line_bytes`` (default 50 MB) with no CRLF, streamed, and then the
  connection closes. Only a cap on line length protects the client.
- ``refuse``: models a provider that limits the account. ``refusal=(COMMAND, ANSWER)``: every
  COMMAND (``GREETING`` for the greeting, ``AUTHENTICATE``, ``LOGIN``, ``EXAMINE``, ``FETCH``...)
  is answered with ANSWER's lines, ``{tag}`` replaced by the command's tag; after a ``* BYE`` line
  the connection closes. E.g. Gmail's ``{tag} NO [ALERT] Too many simultaneous connections.
  (Failure)`` on AUTHENTICATE, or Exchange's ``{tag} BAD Request is throttled. Suggested Backoff
  Time: 299961 milliseconds`` then ``* BYE Connection closed. 14`` on FETCH.

Every loop of the server (reading, streaming, dripping) ends when the client disconnects, when
:meth:`HostileImapServer.stop` is called, or after ``stream_deadline`` seconds, whichever is first.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import random
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import TypeAlias

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "IMAP4rev1", "LITERAL+", "SASL-IR", "AUTH=PLAIN", "ESEARCH", "NAMESPACE", "ENABLE",
)
DEFAULT_DATE = datetime(2024, 1, 15, 12, 0, 0, tzinfo=UTC)
MiB = 1024 * 1024

_CHUNK = 64 * 1024
_MAX_COMMAND_BYTES = 1 * MiB  # the fake protects itself too: a longer command gets BYE
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SYSTEM_FLAGS = r"(\Answered \Flagged \Deleted \Seen \Draft)"
# Commands of the sync part, where slow_drip and long_line turn hostile.
_SYNC_COMMANDS = frozenset({"LIST", "LSUB", "STATUS", "SELECT", "EXAMINE", "SEARCH", "FETCH"})
_LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}\r?\n\Z")
_BODY_ITEM = re.compile(r"\A(BODY\.PEEK|BODY)\[(|HEADER|TEXT)\](?:<(\d+)\.(\d+)>)?\Z")
_SEQ_SET = re.compile(r"\A(?:\d+|\*)(?::(?:\d+|\*))?(?:,(?:\d+|\*)(?::(?:\d+|\*))?)*\Z")

Token: TypeAlias = "str | list[Token]"
Runs = list[tuple[int, int]]  # sorted, disjoint, inclusive ranges of message indices (0-based)


# -- the folder model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderSpec:
    """One folder. ``uids`` must ascend strictly; a ``range`` keeps a huge folder free.

    The message sequence number of ``uids[i]`` is ``i + 1`` (RFC 3501 2.3.1.2).
    """

    uids: Sequence[int] = range(1, 11)
    uidvalidity: int = 1
    internal_date: datetime | Callable[[int], datetime] = DEFAULT_DATE
    flags: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    modseqs: Mapping[int, int] = field(default_factory=dict)  # UID -> MODSEQ, default 1
    attributes: tuple[str, ...] = ()  # extra LIST attributes, e.g. ("\\Sent",)

    def __post_init__(self) -> None:
        if isinstance(self.uids, range):
            if self.uids.step != 1 or (len(self.uids) and self.uids[0] < 1):
                raise ValueError("a range of UIDs must start at 1 or more with step 1")
        elif any(b <= a for a, b in zip(self.uids, self.uids[1:], strict=False)) or (
                len(self.uids) and self.uids[0] < 1):
            raise ValueError("UIDs must be positive and strictly ascending")

    @property
    def uidnext(self) -> int:
        return self.uids[-1] + 1 if len(self.uids) else 1

    @property
    def highestmodseq(self) -> int:
        return max(self.modseqs.values(), default=1)

    def date_of(self, uid: int) -> datetime:
        return self.internal_date(uid) if callable(self.internal_date) else self.internal_date

    def modseq_of(self, uid: int) -> int:
        return self.modseqs.get(uid, 1)

    def message(self, uid: int, folder: str = "INBOX") -> bytes:
        """The deterministic RFC 822 message at ``uid``: what BODY[] returns in healthy mode."""
        head = _headers(uid, self.uidvalidity, self.date_of(uid))
        body = f"This is message {uid} of folder {folder}.\r\n".encode()
        return head + b"\r\n" + body


def _headers(uid: int, uidvalidity: int, when: datetime, extra: bytes = b"") -> bytes:
    return (
        f"Date: {format_datetime(when)}\r\n"
        "From: Sender <sender@hostile.invalid>\r\n"
        "To: User <user@hostile.invalid>\r\n"
        f"Subject: Message {uid}\r\n"
        f"Message-ID: <{uid}.{uidvalidity}@hostile.invalid>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
    ).encode() + extra


def default_folders() -> dict[str, FolderSpec]:
    """A small tree with a parent, so LIST shows both \\HasChildren and \\HasNoChildren."""
    return {
        "INBOX": FolderSpec(uids=range(1, 11)),
        "Sent": FolderSpec(uids=range(1, 4), uidvalidity=2, attributes=("\\Sent",)),
        "Archive": FolderSpec(uids=range(1, 1), uidvalidity=3),
        "Archive/2023": FolderSpec(uids=[2, 5, 9], uidvalidity=4),
    }


# -- message bodies, small or generated on the fly ----------------------------------------------


class _Payload:
    """A message body of known size that can be read in chunks (a literal's source)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)
        self.header_size = data.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else self.size

    def chunks(self, start: int, length: int) -> Iterator[bytes]:
        for pos in range(start, start + length, _CHUNK):
            yield self._data[pos:min(pos + _CHUNK, start + length)]


class _GeneratedPayload(_Payload):
    """A valid RFC 822 message of exactly ``size`` bytes: headers, a blank line, then identical
    78-byte filler lines. A header pads the headers so that the filler is whole lines. Chunks are
    slices of one precomputed block: memory stays at one chunk whatever the size."""

    _LINE = b"filler " + b"0123456789" * 6 + b"abcdefghi\r\n"  # 78 bytes

    def __init__(self, uid: int, uidvalidity: int, when: datetime, size: int) -> None:
        line = len(self._LINE)
        base = _headers(uid, uidvalidity, when, b"X-Padding: \r\n") + b"\r\n"
        if size < len(base) + line:
            raise ValueError(f"a generated message needs at least {len(base) + line} bytes")
        pad = (size - len(base)) % line  # what the filler's whole lines leave over
        pad_header = b"X-Padding: " + b"p" * pad + b"\r\n"
        self._head = _headers(uid, uidvalidity, when, pad_header) + b"\r\n"
        assert (size - len(self._head)) % line == 0
        self.size = size
        self.header_size = len(self._head)
        self._block = self._LINE * (_CHUNK // line + 2)

    def chunks(self, start: int, length: int) -> Iterator[bytes]:
        end = start + length
        if start < len(self._head):
            yield self._head[start:min(end, len(self._head))]
            start = len(self._head)
        line = len(self._LINE)
        while start < end:
            n = min(_CHUNK, end - start)
            offset = (start - len(self._head)) % line
            yield self._block[offset:offset + n]
            start += n


# -- protocol helpers ---------------------------------------------------------------------------


class _Gone(Exception):
    """The client left, the server is stopping, or a stream ran past its deadline."""


class _Refused(Exception):
    """The command was answered with the configured refusal; the session goes on."""


class _Hangup(Exception):
    """Close the connection now (after BYE, or mid-literal on purpose)."""


class _Bad(Exception):
    """The command is malformed or unsupported: tagged BAD with this text."""


def _tokenize(data: bytes) -> list[Token]:
    """Split a command's arguments into atoms, strings (quoted or literal) and lists."""
    stack: list[list[Token]] = [[]]
    pos = 0
    while pos < len(data):
        ch = data[pos:pos + 1]
        if ch in (b" ", b"\r", b"\n"):
            pos += 1
        elif ch == b"(":
            inner: list[Token] = []
            stack[-1].append(inner)
            stack.append(inner)
            pos += 1
        elif ch == b")":
            if len(stack) == 1:
                raise _Bad("unbalanced parenthesis")
            stack.pop()
            pos += 1
        elif ch == b'"':
            out = bytearray()
            pos += 1
            while True:
                if pos >= len(data):
                    raise _Bad("unterminated quoted string")
                c = data[pos]
                if c == 0x5C and pos + 1 < len(data):  # backslash escapes " and \ (RFC 3501 9)
                    out.append(data[pos + 1])
                    pos += 2
                elif c == 0x22:
                    pos += 1
                    break
                else:
                    out.append(c)
                    pos += 1
            stack[-1].append(out.decode("utf-8", "replace"))
        elif ch == b"{":
            m = re.compile(rb"\{(\d+)\+?\}\r?\n").match(data, pos)
            if not m:
                raise _Bad("malformed literal")
            n = int(m[1])
            stack[-1].append(data[m.end():m.end() + n].decode("utf-8", "replace"))
            pos = m.end() + n
        else:
            start = pos
            depth = 0
            while pos < len(data):
                c = data[pos]
                if c == 0x5B:  # '[': a section may hold spaces and parentheses
                    depth += 1
                elif c == 0x5D:
                    depth -= 1
                elif depth <= 0 and c in b" ()\r\n":
                    break
                pos += 1
            stack[-1].append(data[start:pos].decode("utf-8", "replace"))
    if len(stack) != 1:
        raise _Bad("unbalanced parenthesis")
    return stack[0]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _imap_date(when: datetime) -> str:
    """INTERNALDATE's date-time (RFC 3501 9): day space-padded, English month, numeric zone."""
    return (f"{when.day:2d}-{_MONTHS[when.month - 1]}-{when.year:04d} "
            f"{when:%H:%M:%S} {when:%z}")


def _parse_search_date(text: str) -> date:
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
    if not m or m[2].title() not in _MONTHS:
        raise _Bad(f"bad date {text!r}")
    return date(int(m[3]), _MONTHS.index(m[2].title()) + 1, int(m[1]))


def _merge(runs: Iterable[tuple[int, int]]) -> Runs:
    merged: Runs = []
    for lo, hi in sorted(runs):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _intersect(a: Runs, b: Runs) -> Runs:
    out: Runs = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _parse_set(text: str, largest: int) -> list[tuple[int, int]]:
    """A sequence set or UID set; ``*`` is the largest number in use, and ``a:b`` is the same
    as ``b:a`` (RFC 3501 9, seq-range)."""
    if not _SEQ_SET.match(text):
        raise _Bad(f"bad set {text!r}")
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        lo_s, _, hi_s = part.partition(":")
        lo = largest if lo_s == "*" else int(lo_s)
        hi = lo if not hi_s else (largest if hi_s == "*" else int(hi_s))
        out.append((min(lo, hi), max(lo, hi)))
    return out


def _uid_runs_to_indices(folder: FolderSpec, uid_ranges: Iterable[tuple[int, int]]) -> Runs:
    runs = []
    for lo, hi in uid_ranges:
        a = bisect.bisect_left(folder.uids, lo)
        b = bisect.bisect_right(folder.uids, hi) - 1
        if a <= b:
            runs.append((a, b))
    return _merge(runs)


def _seq_runs_to_indices(count: int, seq_ranges: Iterable[tuple[int, int]]) -> Runs:
    return _merge((max(lo, 1) - 1, min(hi, count) - 1) for lo, hi in seq_ranges
                  if max(lo, 1) <= min(hi, count))


def _values(folder: FolderSpec, runs: Runs, uid: bool) -> Iterator[int]:
    for lo, hi in runs:
        if uid:
            yield from folder.uids[lo:hi + 1]
        else:
            yield from range(lo + 1, hi + 2)


def _compress(values: Iterable[int]) -> str:
    """A sequence set in its shortest form: ``1:5,7`` (what ESEARCH ALL returns, RFC 4731)."""
    parts: list[str] = []
    start = prev = -2
    for v in values:
        if v == prev + 1:
            prev = v
            continue
        if start >= 0:
            parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = v
    if start >= 0:
        parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts)


@dataclass
class _Command:
    tag: str
    name: str  # upper case; "UID FETCH" is name "FETCH" with uid=True
    uid: bool
    args: list[Token]


@dataclass
class _Reply:
    untagged: Iterable[bytes]
    status: bytes  # the tagged completion line, CRLF included


# -- the server ---------------------------------------------------------------------------------


class HostileImapServer:
    """A fake IMAP server on 127.0.0.1:<ephemeral port>, one thread per connection.

    Use as a context manager; ``.commands`` lists what clients sent (tag removed, literals
    inlined), ``.connections`` counts accepted connections.
    """

    BEHAVIOURS: tuple[str, ...] = (
        "healthy", "slow_drip", "endless_list", "lying_size", "huge_folder", "garbage_literal",
        "disconnect_mid_literal", "bye_mid_command", "long_line", "idle_drip", "refuse",
    )

    def __init__(
        self,
        behaviour: str = "healthy",
        *,
        messages: int | None = None,
        folders: Mapping[str, FolderSpec] | None = None,
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        extra_capabilities: Sequence[str] = (),
        password: str | None = None,
        delimiter: str = "/",
        drip_interval: float = 3.0,
        literal_bytes: int | None = None,
        huge_uids: int = 1_000_000,
        long_line_bytes: int = 50_000_000,
        bye_times: int = 1,
        bye_text: str = "server shutting down",
        bye_commands: Sequence[str] = ("SELECT", "EXAMINE", "FETCH"),
        bye_skip: int = 0,
        refusal: tuple[str, str] = ("AUTHENTICATE", "{tag} NO [UNAVAILABLE] Try again later"),
        stream_deadline: float = 300.0,
        idle_timeout: float = 120.0,
    ) -> None:
        if behaviour not in self.BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; one of {self.BEHAVIOURS}")
        if messages is not None and folders is not None:
            raise ValueError("give messages= (INBOX with UIDs 1..n) or folders=, not both")
        self.behaviour = behaviour
        if folders is None:
            folders = default_folders()
            if messages is not None:
                folders["INBOX"] = FolderSpec(uids=range(1, messages + 1))
        folders = dict(folders)
        if behaviour == "huge_folder":
            inbox = folders.get("INBOX", FolderSpec())
            folders["INBOX"] = FolderSpec(
                uids=range(1, huge_uids + 1), uidvalidity=inbox.uidvalidity,
                internal_date=inbox.internal_date)
        self.folders: dict[str, FolderSpec] = folders
        self.capabilities: tuple[str, ...] = (*capabilities, *extra_capabilities)
        self.password = password
        self.delimiter = delimiter
        self.drip_interval = drip_interval
        self.literal_bytes = literal_bytes
        self.long_line_bytes = long_line_bytes
        self.refusal = (refusal[0].upper(), refusal[1])
        self.stream_deadline = stream_deadline
        self.idle_timeout = idle_timeout
        self.host = "127.0.0.1"
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._commands: list[str] = []
        self._errors: list[str] = []
        self._connections = 0
        self._byes_left = bye_times
        self.bye_text = bye_text
        self.bye_commands = tuple(c.upper() for c in bye_commands)
        self._bye_skip = bye_skip
        self.bearer_tokens: list[str] = []  # what AUTHENTICATE XOAUTH2 was given, in order
        self._sessions: list[tuple[socket.socket, threading.Thread]] = []
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="hostile-imap-accept",
                                               daemon=True)
        self._started = False

    # -- life cycle -----------------------------------------------------------------------------

    def __enter__(self) -> HostileImapServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is None and self.errors:  # a bug of the fake must not pass as a client's
            raise AssertionError(f"the fake IMAP server failed: {self.errors}")

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, then join all threads (bounded)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sessions = list(self._sessions)
        for sock, _ in sessions:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        if self._started:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for sock, thread in sessions:
            thread.join(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                sock.close()

    # -- what tests observe ---------------------------------------------------------------------

    @property
    def commands(self) -> list[str]:
        """Commands received so far, oldest first, as ``"UID FETCH 1:5 (BODY.PEEK[])"``."""
        with self._lock:
            return list(self._commands)

    @property
    def errors(self) -> list[str]:
        """Exceptions that ended a connection thread: bugs of the fake, [] when all is well."""
        with self._lock:
            return list(self._errors)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def active_connections(self) -> int:
        """Connection threads still running: 0 once every client left (or stop() ran)."""
        with self._lock:
            return sum(1 for _, thread in self._sessions if thread.is_alive())

    def message(self, folder: str, uid: int) -> bytes:
        """The bytes a healthy BODY[] of ``uid`` in ``folder`` returns."""
        return self.folders[folder].message(uid, folder)

    # -- internals ------------------------------------------------------------------------------

    def _record_error(self, error: str) -> None:
        with self._lock:
            self._errors.append(error)

    def _record(self, command: str) -> None:
        with self._lock:
            self._commands.append(command)

    def _take_bye(self) -> bool:
        with self._lock:
            if self._bye_skip > 0:
                self._bye_skip -= 1
                return False
            if self._byes_left <= 0:
                return False
            self._byes_left -= 1
            return True

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(0.25)
            session = _Session(self, sock)
            thread = threading.Thread(target=session.run, name=f"hostile-imap-{self.port}",
                                      daemon=True)
            with self._lock:
                self._connections += 1
                self._sessions.append((sock, thread))
            thread.start()


class _Session:
    """One client connection: reads commands, answers them, turns hostile where configured."""

    def __init__(self, server: HostileImapServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.behaviour = server.behaviour
        self.authenticated = False
        self.selected: tuple[str, FolderSpec] | None = None
        self.hostile_done = False  # long_line fires once per connection
        self._buf = bytearray()
        self._stream_deadline = 0.0

    # -- socket I/O, every wait bounded by stop() and deadlines ---------------------------------

    def _check(self) -> None:
        if self.server._stopping.is_set():
            raise _Gone
        if self._stream_deadline and time.monotonic() > self._stream_deadline:
            raise _Gone

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        stalled_since = time.monotonic()
        while view:
            self._check()
            try:
                n = self.sock.send(view)
            except TimeoutError:
                if time.monotonic() - stalled_since > self.server.idle_timeout:
                    raise _Gone from None
                continue
            except OSError:
                raise _Gone from None
            view = view[n:]
            stalled_since = time.monotonic()

    def _peer_closed(self) -> bool:
        """True once the client closed its end (EOF readable), checked without blocking."""
        # poll() rather than select(), which fails on descriptors >= 1024.
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(0):
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _fill(self) -> None:
        idle_until = time.monotonic() + self.server.idle_timeout
        while True:
            self._check()
            try:
                data = self.sock.recv(_CHUNK)
            except TimeoutError:
                if time.monotonic() > idle_until:
                    raise _Gone from None
                continue
            except OSError:
                raise _Gone from None
            if not data:
                raise _Gone
            self._buf += data
            return

    def _readline(self, limit: int) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end + 1])
                del self._buf[:end + 1]
                return line
            if len(self._buf) > limit:
                raise _Hangup
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _read_command(self) -> bytes:
        """One command with its literals inlined; a synchronizing literal ``{n}`` gets a ``+``
        continuation first, a LITERAL+ one ``{n+}`` does not (RFC 7888)."""
        data = bytearray()
        while True:
            data += self._readline(_MAX_COMMAND_BYTES - len(data))
            m = _LITERAL_AT_END.search(data)
            if not m:
                return bytes(data)
            n = int(m[1])
            if len(data) + n > _MAX_COMMAND_BYTES:
                self._send(b"* BYE command too long\r\n")
                raise _Hangup
            if not m[2]:
                self._send(b"+ Ready for literal data\r\n")
            data += self._read_exact(n)

    # -- the command loop -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            caps = " ".join(self.server.capabilities)
            if self.behaviour == "refuse" and self.server.refusal[0] == "GREETING":
                self._refuse("*")
            self._send(f"* OK [CAPABILITY {caps}] Hostile IMAP ready\r\n".encode())
            while True:
                raw = self._read_command()
                command = self._parse(raw)
                if command is None:
                    continue
                self._execute(command)
        except (_Gone, _Hangup):
            pass
        except Exception as exc:  # a bug of the fake: visible to tests, never a silent hang
            self.server._record_error(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(_Gone, _Hangup):
                self._send(b"* BYE internal error of the fake server\r\n")
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _parse(self, raw: bytes) -> _Command | None:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        tag, _, rest = text.partition(" ")
        if not text.strip():
            return None
        self.server._record(rest)
        if not tag or tag == "*" or tag == "+" or not rest:
            self._send(f"{tag or '*'} BAD Missing command\r\n".encode())
            return None
        try:
            tokens = _tokenize(raw.rstrip(b"\r\n")[len(tag.encode()) + 1:])
        except _Bad as exc:
            self._send(f"{tag} BAD {exc}\r\n".encode())
            return None
        name = str(tokens[0]).upper() if tokens and isinstance(tokens[0], str) else ""
        uid = False
        args = tokens[1:]
        if name == "UID" and args and isinstance(args[0], str):
            uid = True
            name = args[0].upper()
            args = args[1:]
        return _Command(tag, name, uid, args)

    def _execute(self, cmd: _Command) -> None:
        handler = _HANDLERS.get(cmd.name)
        if handler is None or (cmd.uid and cmd.name not in ("FETCH", "SEARCH")):
            self._send(f"{cmd.tag} BAD Unknown command\r\n".encode())
            return
        if cmd.name not in _ANY_STATE and not self.authenticated:
            self._send(f"{cmd.tag} BAD Command not valid before login\r\n".encode())
            return
        if cmd.name in ("FETCH", "SEARCH", "CLOSE", "UNSELECT") and self.selected is None:
            self._send(f"{cmd.tag} BAD No mailbox selected\r\n".encode())
            return
        # Every command, hostile streams included, ends within stream_deadline.
        self._stream_deadline = time.monotonic() + self.server.stream_deadline
        try:
            try:
                self._turn_hostile_before(cmd)
            except _Refused:
                return
            try:
                reply = handler(self, cmd)
            except _Bad as exc:
                self._send(f"{cmd.tag} BAD {exc}\r\n".encode())
                return
            if self.behaviour == "slow_drip" and self.authenticated and cmd.name in _SYNC_COMMANDS:
                self._drip(reply)
            self._write(reply)
        finally:
            self._stream_deadline = 0.0

    def _write(self, reply: _Reply) -> None:
        """Sends the answer in chunks of about 64 KiB, whatever its size; a generator that raises
        _Hangup (a literal cut on purpose) gets what it yielded sent first."""
        pending = bytearray()
        try:
            for chunk in reply.untagged:
                pending += chunk
                if len(pending) >= _CHUNK:
                    self._send(bytes(pending))
                    pending.clear()
        except _Hangup:
            self._send(bytes(pending))
            raise
        self._send(bytes(pending) + reply.status)

    # -- misbehaviours --------------------------------------------------------------------------

    def _refuse(self, tag: str) -> None:
        """The configured refusal, instead of the answer; a BYE in it ends the connection."""
        lines = [line.replace("{tag}", tag) for line in self.server.refusal[1].splitlines()]
        self._send("".join(f"{line}\r\n" for line in lines).encode())
        if any(line.startswith("* BYE") for line in lines):
            raise _Hangup
        raise _Refused

    def _turn_hostile_before(self, cmd: _Command) -> None:
        """Misbehaviours that replace the whole answer and end the connection."""
        if self.behaviour == "refuse" and cmd.name == self.server.refusal[0]:
            self._refuse(cmd.tag)
        if not self.authenticated:
            return
        if self.behaviour == "bye_mid_command" and cmd.name in self.server.bye_commands \
                and self.server._take_bye():
            self._send(f"* BYE {self.server.bye_text}\r\n".encode())
            raise _Hangup
        if self.behaviour == "long_line" and cmd.name in _SYNC_COMMANDS and not self.hostile_done:
            self.hostile_done = True
            self._send(b"* OK ")
            left = self.server.long_line_bytes - 5
            block = b"x" * _CHUNK
            while left > 0:
                self._send(block[:min(left, _CHUNK)])
                left -= _CHUNK
            raise _Hangup

    def _drip(self, reply: _Reply) -> None:
        """One byte per drip_interval: the real untagged data, then keep-alive lines forever."""

        def forever() -> Iterator[bytes]:
            yield from reply.untagged
            while True:
                yield b"* OK still working\r\n"

        for chunk in forever():
            for i in range(len(chunk)):
                if self._peer_closed():
                    raise _Gone
                self._send(chunk[i:i + 1])
                if self.server._stopping.wait(self.server.drip_interval):
                    raise _Gone

    def _endless_list(self) -> None:
        delim = self.server.delimiter
        n = 0
        while True:
            if self._peer_closed():
                raise _Gone
            lines = [f'* LIST (\\HasNoChildren) "{delim}" "folder{i}"\r\n'
                     for i in range(n, n + 1000)]
            n += 1000
            self._send("".join(lines).encode())

    def _garbage(self, seq: int, uid: int) -> Iterator[bytes]:
        yield f"* {seq} FETCH (UID {uid} BODY[] {{99999999999}}\r\n".encode()
        block = random.Random(uid).randbytes(_CHUNK)
        while True:
            if self._peer_closed():
                raise _Gone
            yield block

    # -- handlers -------------------------------------------------------------------------------

    def _ok(self, cmd: _Command, text: str) -> bytes:
        return f"{cmd.tag} OK {text}\r\n".encode()

    def _capability(self, cmd: _Command) -> _Reply:
        caps = " ".join(self.server.capabilities)
        return _Reply([f"* CAPABILITY {caps}\r\n".encode()], self._ok(cmd, "CAPABILITY completed"))

    def _noop(self, cmd: _Command) -> _Reply:
        return _Reply([], self._ok(cmd, "NOOP completed"))

    def _idle(self, cmd: _Command) -> _Reply:
        if self.behaviour != "idle_drip":
            raise _Bad("IDLE not supported")
        self._send(b"+ idling\r\n")
        self._drip(_Reply([b"* 1 EXISTS\r\n"], b""))
        raise _Gone

    def _logout(self, cmd: _Command) -> _Reply:
        self._send(b"* BYE logging out\r\n" + self._ok(cmd, "LOGOUT completed"))
        raise _Hangup

    def _accept_login(self, cmd: _Command, password: str) -> _Reply:
        expected = self.server.password
        if expected is not None and password != expected:
            return _Reply([], f"{cmd.tag} NO [AUTHENTICATIONFAILED] Invalid credentials\r\n".encode())
        self.authenticated = True
        caps = " ".join(self.server.capabilities)
        return _Reply([], self._ok(cmd, f"[CAPABILITY {caps}] Logged in"))

    def _login(self, cmd: _Command) -> _Reply:
        if self.authenticated:
            raise _Bad("Already authenticated")
        if len(cmd.args) != 2 or not all(isinstance(a, str) for a in cmd.args):
            raise _Bad("LOGIN needs a user name and a password")
        return self._accept_login(cmd, str(cmd.args[1]))

    def _authenticate(self, cmd: _Command) -> _Reply:
        """AUTHENTICATE PLAIN (RFC 4616), the response inline when SASL-IR allows (RFC 4959)."""
        if self.authenticated:
            raise _Bad("Already authenticated")
        if not cmd.args or not isinstance(cmd.args[0], str):
            raise _Bad("AUTHENTICATE needs a mechanism")
        mechanism = cmd.args[0].upper()
        if mechanism == "XOAUTH2" and "AUTH=XOAUTH2" in self.server.capabilities:
            return self._xoauth2(cmd)
        if mechanism != "PLAIN" or "AUTH=PLAIN" not in self.server.capabilities:
            return _Reply([], f"{cmd.tag} NO [CANNOT] Unsupported mechanism\r\n".encode())
        if len(cmd.args) > 1:
            if "SASL-IR" not in self.server.capabilities:
                raise _Bad("SASL-IR not advertised")
            response = str(cmd.args[1])
            response = "" if response == "=" else response  # "=" is an empty response
        else:
            self._send(b"+ \r\n")
            response = self._readline(_MAX_COMMAND_BYTES).decode("ascii", "replace").strip()
            if response == "*":
                raise _Bad("AUTHENTICATE cancelled")
        try:
            decoded = base64.b64decode(response, validate=True)
        except ValueError:
            raise _Bad("Invalid base64") from None
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return _Reply([], f"{cmd.tag} NO [AUTHENTICATIONFAILED] Malformed PLAIN\r\n".encode())
        return self._accept_login(cmd, parts[2].decode("utf-8", "replace"))

    def _xoauth2(self, cmd: _Command) -> _Reply:
        """XOAUTH2 with SASL-IR: ``user=U^Aauth=Bearer T^A^A``; any token is taken (and
        recorded), unless ``password`` is set: then the token must equal it."""
        if len(cmd.args) < 2:
            raise _Bad("XOAUTH2 needs an initial response here")
        decoded = base64.b64decode(str(cmd.args[1])).decode("utf-8", "replace")
        fields = dict(part.split("=", 1) for part in decoded.split("\x01") if "=" in part)
        token = fields.get("auth", "").removeprefix("Bearer ")
        with self.server._lock:
            self.server.bearer_tokens.append(token)
        return self._accept_login(cmd, token)

    def _enable(self, cmd: _Command) -> _Reply:
        wanted = [str(a).upper() for a in cmd.args]
        enabled = [c for c in wanted if c in self.server.capabilities
                   and c in ("CONDSTORE", "QRESYNC", "UTF8=ACCEPT")]
        line = " ".join(["* ENABLED", *enabled]) + "\r\n"
        return _Reply([line.encode()], self._ok(cmd, "ENABLE completed"))

    def _namespace(self, cmd: _Command) -> _Reply:
        line = f'* NAMESPACE (("" {_quote(self.server.delimiter)})) NIL NIL\r\n'
        return _Reply([line.encode()], self._ok(cmd, "NAMESPACE completed"))

    def _list(self, cmd: _Command) -> _Reply:
        if len(cmd.args) != 2 or not all(isinstance(a, str) for a in cmd.args):
            raise _Bad("LIST needs a reference and a pattern")
        if self.behaviour == "endless_list" and cmd.name == "LIST":
            self._endless_list()
        reference, pattern = str(cmd.args[0]), str(cmd.args[1])
        delim = self.server.delimiter
        if pattern == "":
            line = f"* {cmd.name} (\\Noselect) {_quote(delim)} \"\"\r\n"
            return _Reply([line.encode()], self._ok(cmd, f"{cmd.name} completed"))
        regex = re.compile("".join(
            ".*" if c == "*" else f"[^{re.escape(delim)}]*" if c == "%" else re.escape(c)
            for c in reference + pattern) + r"\Z")
        lines = []
        for name, spec in self.server.folders.items():
            if not regex.match(name):
                continue
            children = any(other.startswith(name + delim) for other in self.server.folders)
            attrs = " ".join(("\\HasChildren" if children else "\\HasNoChildren", *spec.attributes))
            lines.append(f"* {cmd.name} ({attrs}) {_quote(delim)} {_quote(name)}\r\n".encode())
        return _Reply(lines, self._ok(cmd, f"{cmd.name} completed"))

    def _folder(self, token: Token) -> tuple[str, FolderSpec]:
        if not isinstance(token, str):
            raise _Bad("a mailbox name is expected")
        name = "INBOX" if token.upper() == "INBOX" else token
        spec = self.server.folders.get(name)
        if spec is None:
            raise _NoSuchFolder(name)
        return name, spec

    def _status(self, cmd: _Command) -> _Reply:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], list):
            raise _Bad("STATUS needs a mailbox and a list of items")
        try:
            name, spec = self._folder(cmd.args[0])
        except _NoSuchFolder:
            return _Reply([], f"{cmd.tag} NO [NONEXISTENT] No such mailbox\r\n".encode())
        values = {"MESSAGES": len(spec.uids), "UIDNEXT": spec.uidnext,
                  "UIDVALIDITY": spec.uidvalidity, "UNSEEN": 0, "RECENT": 0}
        if "CONDSTORE" in self.server.capabilities:
            values["HIGHESTMODSEQ"] = spec.highestmodseq
        items = []
        for item in cmd.args[1]:
            key = str(item).upper()
            if key not in values:
                raise _Bad(f"unsupported STATUS item {key}")
            items.append(f"{key} {values[key]}")
        line = f"* STATUS {_quote(name)} ({' '.join(items)})\r\n"
        return _Reply([line.encode()], self._ok(cmd, "STATUS completed"))

    def _select(self, cmd: _Command) -> _Reply:
        if not cmd.args:
            raise _Bad("SELECT needs a mailbox")
        self.selected = None  # a failed SELECT leaves no mailbox selected (RFC 3501 6.3.1)
        try:
            name, spec = self._folder(cmd.args[0])
        except _NoSuchFolder:
            return _Reply([], f"{cmd.tag} NO [NONEXISTENT] No such mailbox\r\n".encode())
        self.selected = (name, spec)
        lines = [f"* FLAGS {_SYSTEM_FLAGS}\r\n".encode()]
        if cmd.name == "SELECT":
            lines.append(f"* OK [PERMANENTFLAGS {_SYSTEM_FLAGS[:-1]} \\*)] Limited\r\n".encode())
        lines += [
            f"* {len(spec.uids)} EXISTS\r\n".encode(),
            b"* 0 RECENT\r\n",
            f"* OK [UIDVALIDITY {spec.uidvalidity}] UIDs valid\r\n".encode(),
            f"* OK [UIDNEXT {spec.uidnext}] Predicted next UID\r\n".encode(),
        ]
        if "CONDSTORE" in self.server.capabilities:
            lines.append(f"* OK [HIGHESTMODSEQ {spec.highestmodseq}] Highest\r\n".encode())
        mode = "READ-WRITE" if cmd.name == "SELECT" else "READ-ONLY"
        return _Reply(lines, self._ok(cmd, f"[{mode}] {cmd.name} completed"))

    def _close(self, cmd: _Command) -> _Reply:
        self.selected = None
        return _Reply([], self._ok(cmd, f"{cmd.name} completed"))

    def _search_runs(self, spec: FolderSpec, keys: list[Token]) -> Runs:
        """The AND of all keys (RFC 3501 6.4.4), as runs of message indices."""
        everything: Runs = [(0, len(spec.uids) - 1)] if len(spec.uids) else []
        result = everything
        i = 0
        while i < len(keys):
            key = keys[i]
            i += 1
            if isinstance(key, list):
                result = _intersect(result, self._search_runs(spec, key))
                continue
            upper = key.upper()
            if upper == "ALL":
                continue
            if upper in ("UID", "SINCE", "BEFORE", "ON"):
                if i >= len(keys) or not isinstance(keys[i], str):
                    raise _Bad(f"{upper} needs an argument")
                arg = str(keys[i])
                i += 1
                if upper == "UID":
                    largest = spec.uids[-1] if len(spec.uids) else 0
                    runs = _uid_runs_to_indices(spec, _parse_set(arg, largest))
                else:
                    runs = self._date_runs(spec, result, upper, _parse_search_date(arg))
                result = _intersect(result, runs)
            elif _SEQ_SET.match(key):
                result = _intersect(result,
                                    _seq_runs_to_indices(len(spec.uids),
                                                         _parse_set(key, len(spec.uids))))
            else:
                raise _Bad(f"unsupported search key {key}")
        return result

    @staticmethod
    def _date_runs(spec: FolderSpec, within: Runs, key: str, day: date) -> Runs:
        """SINCE/BEFORE/ON compare the internal date's day, ignoring time and zone (6.4.4)."""
        def matches(index: int) -> bool:
            d = spec.date_of(spec.uids[index]).date()
            return d >= day if key == "SINCE" else d < day if key == "BEFORE" else d == day

        if not callable(spec.internal_date):  # one date for all: all or nothing, O(1)
            return within if within and matches(within[0][0]) else []
        return _merge((i, i) for lo, hi in within for i in range(lo, hi + 1) if matches(i))

    def _search(self, cmd: _Command) -> _Reply:
        assert self.selected is not None
        _, spec = self.selected
        args = list(cmd.args)
        returns: list[str] | None = None
        if len(args) >= 2 and isinstance(args[0], str) and args[0].upper() == "RETURN":
            if "ESEARCH" not in self.server.capabilities:
                raise _Bad("RETURN needs ESEARCH")
            if not isinstance(args[1], list):
                raise _Bad("RETURN needs a list")
            returns = [str(r).upper() for r in args[1]] or ["ALL"]
            if any(r not in ("MIN", "MAX", "COUNT", "ALL") for r in returns):
                raise _Bad("unsupported RETURN option")
            args = args[2:]
        if len(args) >= 2 and isinstance(args[0], str) and args[0].upper() == "CHARSET":
            args = args[2:]
        if not args:
            raise _Bad("SEARCH needs a key")
        runs = self._search_runs(spec, args)
        if returns is not None:
            return _Reply([self._esearch_line(cmd, spec, runs, returns)],
                          self._ok(cmd, "SEARCH completed"))

        def lines() -> Iterator[bytes]:
            # One line however many results, as a real server answers (the client must window).
            yield b"* SEARCH"
            batch: list[bytes] = []
            for value in _values(spec, runs, cmd.uid):
                batch.append(b"%d" % value)
                if len(batch) >= 10_000:
                    yield b" " + b" ".join(batch)
                    batch.clear()
            if batch:
                yield b" " + b" ".join(batch)
            yield b"\r\n"

        return _Reply(lines(), self._ok(cmd, "SEARCH completed"))

    @staticmethod
    def _esearch_line(cmd: _Command, spec: FolderSpec, runs: Runs, returns: list[str]) -> bytes:
        """``* ESEARCH (TAG "a1") UID ALL 1:5,7`` (RFC 4731 3); MIN, MAX and ALL are left out
        when nothing matched, COUNT says 0."""
        parts = [f"* ESEARCH (TAG {_quote(cmd.tag)})"]
        if cmd.uid:
            parts.append("UID")
        count = sum(hi - lo + 1 for lo, hi in runs)
        for option in returns:
            if option == "COUNT":
                parts.append(f"COUNT {count}")
            elif count and option == "MIN":
                parts.append(f"MIN {next(_values(spec, runs[:1], cmd.uid))}")
            elif count and option == "MAX":
                parts.append(f"MAX {next(_values(spec, [(runs[-1][1], runs[-1][1])], cmd.uid))}")
            elif count and option == "ALL":
                if cmd.uid and isinstance(spec.uids, range):  # contiguous UIDs: O(runs)
                    text = ",".join(f"{spec.uids[lo]}:{spec.uids[hi]}" if hi > lo
                                    else str(spec.uids[lo]) for lo, hi in runs)
                else:
                    text = _compress(_values(spec, runs, cmd.uid))
                parts.append(f"ALL {text}")
        return (" ".join(parts) + "\r\n").encode()

    def _fetch(self, cmd: _Command) -> _Reply:
        assert self.selected is not None
        folder, spec = self.selected
        if len(cmd.args) < 2 or not isinstance(cmd.args[0], str):
            raise _Bad("FETCH needs a set and items")
        items_token = cmd.args[1]
        items = [str(t).upper() for t in items_token] if isinstance(items_token, list) \
            else [items_token.upper()]
        if items == ["FAST"]:
            items = ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]
        changed_since: int | None = None
        if len(cmd.args) > 2:
            modifiers = cmd.args[2]
            if (not isinstance(modifiers, list) or len(modifiers) != 2
                    or str(modifiers[0]).upper() != "CHANGEDSINCE"
                    or "CONDSTORE" not in self.server.capabilities):
                raise _Bad("unsupported FETCH modifier")
            changed_since = int(str(modifiers[1]))
        bodies: list[tuple[str, str, int | None, int | None]] = []
        for item in items:
            m = _BODY_ITEM.match(item)
            if m:
                bodies.append((m[2], item, int(m[3]) if m[3] else None, int(m[4]) if m[4] else None))
            elif item == "RFC822":
                bodies.append(("", item, None, None))
            elif item not in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"):
                raise _Bad(f"unsupported FETCH item {item}")
        if cmd.uid:
            largest = spec.uids[-1] if len(spec.uids) else 0
            runs = _uid_runs_to_indices(spec, _parse_set(cmd.args[0], largest))
        else:
            runs = _seq_runs_to_indices(len(spec.uids), _parse_set(cmd.args[0], len(spec.uids)))

        def messages() -> Iterator[bytes]:
            for lo, hi in runs:
                for index in range(lo, hi + 1):
                    uid = spec.uids[index]
                    if changed_since is not None and spec.modseq_of(uid) <= changed_since:
                        continue
                    yield from self._fetch_one(folder, spec, index + 1, uid, items, bodies, cmd.uid)

        return _Reply(messages(), self._ok(cmd, "FETCH completed"))

    def _payload(self, folder: str, spec: FolderSpec, uid: int) -> _Payload:
        if self.behaviour == "lying_size" or (
                self.behaviour == "disconnect_mid_literal" and self.server.literal_bytes):
            size = self.server.literal_bytes or 80 * MiB
            return _GeneratedPayload(uid, spec.uidvalidity, spec.date_of(uid), size)
        return _Payload(spec.message(uid, folder))

    def _fetch_one(self, folder: str, spec: FolderSpec, seq: int, uid: int, items: list[str],
                   bodies: list[tuple[str, str, int | None, int | None]], by_uid: bool,
                   ) -> Iterator[bytes]:
        if self.behaviour == "garbage_literal":
            yield from self._garbage(seq, uid)
        payload = self._payload(folder, spec, uid)
        parts: list[str] = []
        if by_uid or "UID" in items:  # UID FETCH always returns UID (RFC 3501 6.4.8)
            parts.append(f"UID {uid}")
        if "FLAGS" in items:
            parts.append(f"FLAGS ({' '.join(spec.flags.get(uid, ()))})")
        if "INTERNALDATE" in items:
            parts.append(f'INTERNALDATE "{_imap_date(spec.date_of(uid))}"')
        if "RFC822.SIZE" in items:
            size = 100 if self.behaviour == "lying_size" else payload.size
            parts.append(f"RFC822.SIZE {size}")
        if "MODSEQ" in items:
            parts.append(f"MODSEQ ({spec.modseq_of(uid)})")
        head = f"* {seq} FETCH (" + " ".join(parts)
        if not bodies:
            yield (head + ")\r\n").encode()
            return
        yield head.encode()
        for index, (section, item, origin, length) in enumerate(bodies):
            start, end = {"": (0, payload.size), "HEADER": (0, payload.header_size),
                          "TEXT": (payload.header_size, payload.size)}[section]
            name = "RFC822" if item == "RFC822" else f"BODY[{section}]"
            if origin is not None and length is not None:  # partial: <origin> only (6.4.5)
                start = min(end, start + origin)
                end = min(end, start + length)
                name += f"<{origin}>"
            size = end - start
            yield f"{' ' if parts or index else ''}{name} {{{size}}}\r\n".encode()
            if self.behaviour == "disconnect_mid_literal":
                yield from payload.chunks(start, size // 2)
                raise _Hangup
            yield from payload.chunks(start, size)
        yield b")\r\n"


class _NoSuchFolder(Exception):
    pass


_Handler: TypeAlias = Callable[[_Session, _Command], _Reply]
_HANDLERS: dict[str, _Handler] = {
    "CAPABILITY": _Session._capability,
    "NOOP": _Session._noop,
    "LOGOUT": _Session._logout,
    "LOGIN": _Session._login,
    "AUTHENTICATE": _Session._authenticate,
    "ENABLE": _Session._enable,
    "NAMESPACE": _Session._namespace,
    "LIST": _Session._list,
    "LSUB": _Session._list,
    "STATUS": _Session._status,
    "SELECT": _Session._select,
    "EXAMINE": _Session._select,
    "CLOSE": _Session._close,
    "UNSELECT": _Session._close,
    "SEARCH": _Session._search,
    "FETCH": _Session._fetch,
    "IDLE": _Session._idle,
}
_ANY_STATE = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "LOGIN", "AUTHENTICATE"})
