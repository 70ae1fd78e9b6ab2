"""mailferry's IMAP access as a library, in the shape of OroCRM ImapBundle's API.

::

    from shared.imap_library import (ImapConfig, ImapEmailFolderManager, ImapEmailManager,
                                     connector_factory)

    config = ImapConfig("imap.example.com", 993, "ssl", "user", "pwd")
    with connector_factory.create_imap_connector(config) as connector:
        manager = ImapEmailManager(connector)
        query = manager.get_search_query_builder().from_("test@test.com").subject("notice").get()
        manager.select_folder("INBOX")
        emails = manager.find_items(query)
        folders = ImapEmailFolderManager(connector).get_folders(None, recursive=True)

The fetcher uses the same objects. Every failure is a ``shared.errors.ImapError`` subclass with a
one-line message naming the server (``ImapAuthError`` for refused credentials); a bad argument
(a NUL in a search value, a malformed UID set) is a ``ValueError`` raised before anything is sent.
Folder names are the names users see (``"Données/Été"``); they are sent in modified UTF-7
(RFC 3501 section 5.1.3). A name that already is valid modified UTF-7 (a ``raw_name``) is sent
as it is, and a ``Folder`` or ``FolderInfo`` is always selected by its ``raw_name``.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, overload

from imapclient import IMAPClient, imap_utf7
from imapclient.response_parser import parse_message_list

from shared import imap
from shared.errors import ImapProtocolError, NotFound
from shared.imap import FolderStatus, ImapConfig
from shared.imap_search import ImapLiteral, SearchQuery, SearchQueryBuilder, lowest_open_uid
from shared.messages import FolderInfo, FolderType
from shared.mime import ParsedMessage, parse_message

__all__ = [
    "Email",
    "Folder",
    "FolderStatus",
    "ImapConfig",
    "ImapConnector",
    "ImapConnectorFactory",
    "ImapEmailFolderManager",
    "ImapEmailManager",
    "SearchQuery",
    "SearchQueryBuilder",
    "connector_factory",
    "encode_folder_name",
]

_CHUNK = 1000  # UIDs per FETCH: command lines stay short, responses bounded
_HEADER_FIELDS = "FROM TO CC BCC SUBJECT DATE MESSAGE-ID"


# --- connecting ---------------------------------------------------------------------------------


class ImapConnector:
    """One IMAP session for one account: connected and logged in at first use, closed by
    ``close()`` or at the end of a ``with`` block. Not thread-safe (neither is IMAP)."""

    def __init__(self, config: ImapConfig) -> None:
        self._config = config
        self._client: IMAPClient | None = None

    @property
    def config(self) -> ImapConfig:
        return self._config

    @property
    def where(self) -> str:
        """``host:port``, the prefix of every error message."""
        return self._config.address

    @property
    def connected(self) -> bool:
        return self._client is not None

    def connect(self) -> ImapConnector:
        """Connect and log in now (otherwise done at first use); raises ``ImapAuthError`` for
        refused credentials, ``ImapConnectionError`` / ``ImapTlsError`` for the rest."""
        if self._client is None:
            client = imap.open_connection(self._config)
            try:
                imap.login(client, self._config)
            except BaseException:
                imap._close(client)
                raise
            self._client = client
        return self

    @property
    def client(self) -> IMAPClient:
        """The logged-in imapclient session, for what this library does not cover."""
        client = self.connect()._client
        assert client is not None
        return client

    def capabilities(self) -> frozenset[str]:
        with imap.imap_errors(self.where):
            return frozenset(c.decode("ascii", "replace").upper()
                             for c in self.client.capabilities())

    def has_capability(self, name: str) -> bool:
        return name.upper() in self.capabilities()

    def close(self) -> None:
        """Log out (or drop the connection); the connector can connect again afterwards."""
        client, self._client = self._client, None
        if client is not None:
            imap._close(client)

    def __enter__(self) -> ImapConnector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<ImapConnector {self._config.username}@{self.where} {state}>"


class ImapConnectorFactory:
    """Makes connectors; the point where tests or other transports plug in."""

    def create_imap_connector(self, config: ImapConfig) -> ImapConnector:
        return ImapConnector(config)


connector_factory = ImapConnectorFactory()


# --- folder names -------------------------------------------------------------------------------


def encode_folder_name(name: str | Folder | FolderInfo) -> str:
    """The wire name of a folder: modified UTF-7 of a display name (RFC 3501 section 5.1.3),
    or the name itself when it already is valid modified UTF-7 (a ``raw_name``)."""
    if isinstance(name, Folder | FolderInfo):
        return name.raw_name
    if any(c in name for c in "\r\n\0"):
        raise ValueError(f"a folder name cannot contain CR, LF or NUL: {name!r}")
    if name.isascii():
        if "&" not in name:
            return name
        try:
            if imap_utf7.encode(imap_utf7.decode(name.encode("ascii"))).decode("ascii") == name:
                return name
        except ValueError:  # "AT&T" is a display name, not modified UTF-7
            pass
    return str(imap_utf7.encode(name).decode("ascii"))


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Email:
    """What a message list shows, without its body. Addresses as ``Name <addr>``, decoded."""

    uid: int
    flags: tuple[str, ...]  # without \\Recent, which belongs to one session (RFC 3501 2.3.2)
    internal_date: datetime | None  # when the server received it
    size: int  # RFC822.SIZE, in bytes
    subject: str | None
    from_: str | None
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    date: datetime | None  # the Date header
    message_id: str | None


class ImapEmailManager:
    """Select a folder, search it, read its messages. Reads never set ``\\Seen``."""

    def __init__(self, connector: ImapConnector) -> None:
        self.connector = connector
        self._selected: str | None = None

    @property
    def selected_folder(self) -> str | None:
        """The raw name of the selected folder."""
        return self._selected

    def get_search_query_builder(self) -> SearchQueryBuilder:
        return SearchQueryBuilder()

    def select_folder(self, folder: str | Folder | FolderInfo, readonly: bool = True) -> FolderStatus:
        """Open a folder for the next calls; read-only (EXAMINE) unless asked otherwise."""
        raw = encode_folder_name(folder)
        where = f"{self.connector.where} {raw}"
        client = self.connector.client
        self._selected = None
        with imap.imap_errors(where):
            info = client.select_folder(raw, readonly=readonly)
        self._selected = raw
        return FolderStatus(
            uidvalidity=int(info[b"UIDVALIDITY"]),
            uidnext=imap._int(info.get(b"UIDNEXT")),
            highest_modseq=imap._int(info.get(b"HIGHESTMODSEQ")),
            exists=int(info.get(b"EXISTS", 0)),
        )

    def search_uids(self, query: SearchQuery) -> list[int]:
        """The UIDs of the selected folder's messages matching ``query``, ascending."""
        where = self._where()
        found = _uid_search(self.connector.client, query, where)
        lowest = lowest_open_uid(query)
        return sorted(uid for uid in found if lowest is None or uid >= lowest)

    def find_items(self, query: SearchQuery) -> list[Email]:
        """The matching messages' flags, dates, size and envelope headers, by ascending UID."""
        uids = self.search_uids(query)
        section = f"BODY.PEEK[HEADER.FIELDS ({_HEADER_FIELDS})]"
        emails: list[Email] = []
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start:start + _CHUNK]
            data = imap.fetch(self.connector.client, chunk,
                              ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", section), self._where())
            emails.extend(_email(uid, data[uid]) for uid in chunk if uid in data)
        return emails

    @overload
    def fetch(self, uids: int) -> bytes: ...
    @overload
    def fetch(self, uids: Iterable[int]) -> dict[int, bytes]: ...

    def fetch(self, uids: int | Iterable[int]) -> bytes | dict[int, bytes]:
        """Whole messages, exactly as the server holds them (``BODY.PEEK[]``: not marked read).

        One UID gives its bytes (``NotFound`` if the folder has no such message); several give
        ``{uid: bytes}`` for those that exist."""
        if isinstance(uids, int):
            found = self.fetch([uids])
            if uids not in found:
                raise NotFound(f"{self._where()}: no message with UID {uids}")
            return found[uids]
        wanted = sorted(set(uids))
        out: dict[int, bytes] = {}
        for start in range(0, len(wanted), _CHUNK):
            data = imap.fetch(self.connector.client, wanted[start:start + _CHUNK],
                              ("BODY.PEEK[]",), self._where())
            out.update({uid: bytes(v[b"BODY[]"]) for uid, v in data.items() if b"BODY[]" in v})
        return out

    def fetch_parsed(self, uid: int) -> ParsedMessage:
        """One message parsed the way the persister parses it (never raises on bad mail)."""
        return parse_message(self.fetch(uid))

    def _where(self) -> str:
        if self._selected is None:
            raise ImapProtocolError(f"{self.connector.where}: no folder selected; "
                                    "call select_folder first")
        return f"{self.connector.where} {self._selected}"


def _email(uid: int, data: dict[bytes, Any]) -> Email:
    headers = next((bytes(v) for k, v in data.items() if k.startswith(b"BODY[HEADER")), b"")
    parsed = parse_message(headers + b"\r\n")
    return Email(
        uid=uid,
        flags=tuple(f for f in map(_flag, data.get(b"FLAGS", ())) if f.lower() != "\\recent"),
        internal_date=data.get(b"INTERNALDATE"),
        size=int(data.get(b"RFC822.SIZE", 0)),
        subject=parsed.subject,
        from_=parsed.from_,
        to=tuple(parsed.to),
        cc=tuple(parsed.cc),
        bcc=tuple(parsed.bcc),
        date=parsed.date,
        message_id=parsed.message_id,
    )


def _flag(flag: bytes | str) -> str:
    return flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)


def _uid_search(client: IMAPClient, query: SearchQuery, where: str) -> list[int]:
    """``UID SEARCH`` with the query's literals sent as literals.

    ``IMAPClient.search`` cannot be used: it sends a CR or LF inside a quoted string (which
    splits the command), and glues the parentheses of nested criteria onto 8-bit values it
    sends as literals. This writes the command itself, one level down, like
    ``IMAPClient._raw_command``: with LITERAL+ (RFC 7888) a literal goes as ``{n+}`` at once,
    otherwise as ``{n}`` after which the server's ``+`` continuation is awaited (RFC 3501 7.5).
    """
    charset, pieces = query.encode()
    with imap.imap_errors(where):
        literal_plus = client.has_capability("LITERAL+")  # may send CAPABILITY: not mid-command
        conn = client._imap
        tag: bytes = conn._new_tag()
        line = tag + b" UID SEARCH " + (f"CHARSET {charset} ".encode() if charset else b"")
        for piece in pieces:
            if not isinstance(piece, ImapLiteral):
                line += piece
                continue
            size = str(len(piece.data)).encode("ascii")
            if literal_plus:
                line += b"{" + size + b"+}\r\n" + piece.data
                continue
            conn.send(line + b"{" + size + b"}\r\n")
            while conn._get_response() is not None:  # None: the "+" continuation
                done = conn.tagged_commands.get(tag)
                if done:
                    conn.tagged_commands.pop(tag, None)
                    raise ImapProtocolError(f"{where}: search refused: {_response_text(done)}")
            line = piece.data
        conn.send(line + b"\r\n")
        typ, data = conn._command_complete("SEARCH", tag)
        if typ != "OK":
            text = _response_text((typ, data))
            if "[BADCHARSET" in text.upper():
                raise ImapProtocolError(
                    f"{where}: the server cannot search in {charset or 'US-ASCII'}"
                    f" (non-ASCII search values need CHARSET UTF-8): {text}")
            raise ImapProtocolError(f"{where}: search refused: {text}")
        typ, data = conn._untagged_response(typ, data, "SEARCH")
        return [int(uid) for uid in parse_message_list(data)]


def _response_text(response: Any) -> str:
    typ, data = response
    parts = [d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d) for d in data or ()]
    return " ".join(f"{typ} {' '.join(parts)}".split())


# --- folders ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    """One folder of the tree. ``path`` is the full name users see (``Données/Été``), ``name``
    its last part (``Été``), ``raw_name`` the full name on the wire (``Donn&AOk-es/&AMk-t&AOk-``).
    A parent the server did not list is shown with ``\\NonExistent`` and not selectable."""

    name: str
    path: str
    raw_name: str
    delimiter: str | None
    type: FolderType
    flags: tuple[str, ...]
    selectable: bool
    children: tuple[Folder, ...] = ()

    def walk(self) -> Iterator[Folder]:
        """This folder, then its descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict."""
        return {
            "name": self.name, "path": self.path, "raw_name": self.raw_name,
            "delimiter": self.delimiter, "type": self.type, "flags": list(self.flags),
            "selectable": self.selectable, "children": [c.to_dict() for c in self.children],
        }


class ImapEmailFolderManager:
    """The account's folders, as the server lists them (one ``LIST "" "*"``)."""

    def __init__(self, connector: ImapConnector) -> None:
        self.connector = connector

    def list_folders(self) -> list[FolderInfo]:
        """Every folder, flat, in the server's order (what the sync stores)."""
        return imap.list_folders(self.connector.client, self.connector.where)

    def get_folders(self, parent: str | Folder | None = None, recursive: bool = True) -> list[Folder]:
        """The folders under ``parent`` (``None``: the top level; a display or raw name), as a
        tree when ``recursive``, otherwise only the direct children (with no ``children``).
        The inbox comes first, then names in case-insensitive order. ``NotFound`` when the
        server has no folder ``parent``."""
        roots = folder_tree(self.list_folders())
        if parent is None:
            found = roots
        else:
            wanted = encode_folder_name(parent)
            path = parent.path if isinstance(parent, Folder) else parent
            node = next((f for r in roots for f in r.walk()
                         if f.raw_name == wanted or f.path == path
                         or (wanted.upper() == "INBOX" and f.raw_name.upper() == "INBOX")), None)
            if node is None:
                raise NotFound(f"{self.connector.where}: no folder {parent!r}")
            found = list(node.children)
        if recursive:
            return found
        return [dataclasses.replace(f, children=()) for f in found]


def folder_tree(infos: Iterable[FolderInfo]) -> list[Folder]:
    """Nest a flat LIST into trees by the hierarchy delimiter; returns the top-level folders."""
    infos = list(infos)
    by_raw = {f.raw_name: f for f in infos}
    kids: dict[str | None, list[str]] = {}

    def parent_of(raw: str, delimiter: str | None) -> str | None:
        if not delimiter or delimiter not in raw.strip(delimiter):
            return None
        return raw.rstrip(delimiter).rsplit(delimiter, 1)[0]

    def place(raw: str, delimiter: str | None) -> None:
        parent = parent_of(raw, delimiter)
        if parent is not None and parent not in by_raw:
            # Listed "A/B" without "A" (RFC 3501 6.3.8 allows it): show "A" as a placeholder.
            name, _ = imap.decode_folder_name(parent.encode("utf-8", "surrogateescape"))
            by_raw[parent] = FolderInfo(name=name, raw_name=parent, delimiter=delimiter,
                                        flags=("\\NonExistent",), selectable=False,
                                        type=imap.folder_type(name, delimiter, ()))
            place(parent, delimiter)
        kids.setdefault(parent, []).append(raw)

    for info in infos:
        place(info.raw_name, info.delimiter)

    def build(raw: str) -> Folder:
        info = by_raw[raw]
        leaf = info.name.rsplit(info.delimiter, 1)[-1] if info.delimiter else info.name
        return Folder(name=leaf or info.name, path=info.name, raw_name=info.raw_name,
                      delimiter=info.delimiter, type=info.type, flags=info.flags,
                      selectable=info.selectable, children=_ordered(build(k) for k in kids.get(raw, ())))

    return list(_ordered(build(raw) for raw in kids.get(None, ())))


def _ordered(folders: Iterable[Folder]) -> tuple[Folder, ...]:
    """The inbox first, then by name, case and accents aside ("Été" before "Hiver")."""
    return tuple(sorted(folders, key=lambda f: (f.type != "inbox", _fold(f.name), f.raw_name)))


def _fold(name: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", name.casefold())
                   if not unicodedata.combining(c))
