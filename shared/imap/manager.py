"""Reading one folder as a library user does: select, search, list, fetch whole messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, overload

from mailferry.errors import ImapLimitExceeded, ImapProtocolError, NotFound
from mailferry.imap import wire
from mailferry.imap.connection import ImapConnector, imap_errors
from mailferry.imap.folders import Folder, encode_folder_name
from mailferry.imap.search import SearchQuery, SearchQueryBuilder, lowest_open_uid
from mailferry.messages import FolderInfo
from mailferry.mime import ParsedMessage, parse_message

_CHUNK = 1000  # UIDs per FETCH: command lines stay short, responses bounded
_HEADER_FIELDS = "FROM TO CC BCC SUBJECT DATE MESSAGE-ID"


@dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int | None
    highest_modseq: int | None
    exists: int


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
        with imap_errors(where):
            info = client.select_folder(raw, readonly=readonly)
            status = FolderStatus(
                uidvalidity=int(info[b"UIDVALIDITY"]),
                uidnext=number(info.get(b"UIDNEXT")),
                highest_modseq=number(info.get(b"HIGHESTMODSEQ")),
                exists=int(info.get(b"EXISTS", 0)),
            )
        self._selected = raw
        return status

    def search_uids(self, query: SearchQuery) -> list[int]:
        """The UIDs of the selected folder's messages matching ``query``, ascending."""
        where = self._where()
        charset, pieces = query.encode()
        with imap_errors(where):
            found = wire.uid_search(self.connector.client, pieces, charset, where)
        lowest = lowest_open_uid(query)
        return sorted(uid for uid in found if lowest is None or uid >= lowest)

    def find_items(self, query: SearchQuery) -> list[Email]:
        """The matching messages' flags, dates, size and envelope headers, by ascending UID."""
        uids = self.search_uids(query)
        section = f"BODY.PEEK[HEADER.FIELDS ({_HEADER_FIELDS})]"
        emails: list[Email] = []
        for start in range(0, len(uids), _CHUNK):
            chunk = uids[start:start + _CHUNK]
            data = self._fetch(chunk, ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", section))
            emails.extend(_email(uid, data[uid]) for uid in chunk if uid in data)
        return emails

    @overload
    def fetch(self, uids: int) -> bytes: ...
    @overload
    def fetch(self, uids: Iterable[int]) -> dict[int, bytes]: ...

    def fetch(self, uids: int | Iterable[int]) -> bytes | dict[int, bytes]:
        """Whole messages, exactly as the server holds them (``BODY.PEEK[]``: not marked read).

        One UID gives its bytes (``NotFound`` if the folder has no such message); several give
        ``{uid: bytes}`` for those that exist. A message larger than the connection's
        ``max_literal_bytes`` is never held in memory: ``ImapLimitExceeded`` for one UID, left
        out of the dict for several."""
        if isinstance(uids, int):
            body = self._fetch([uids], ("BODY.PEEK[]",)).get(uids, {}).get(b"BODY[]")
            if body is None:
                raise NotFound(f"{self._where()}: no message with UID {uids}")
            if isinstance(body, wire.SkippedLiteral):
                raise ImapLimitExceeded(f"{self._where()}: message {uids} is larger than "
                                        f"{self.connector.config.limits.max_literal_bytes} bytes")
            return bytes(body)
        wanted = sorted(set(uids))
        out: dict[int, bytes] = {}
        for start in range(0, len(wanted), _CHUNK):
            data = self._fetch(wanted[start:start + _CHUNK], ("BODY.PEEK[]",))
            out.update({uid: bytes(body) for uid, v in data.items()
                        if (body := v.get(b"BODY[]")) is not None
                        and not isinstance(body, wire.SkippedLiteral)})
        return out

    def fetch_parsed(self, uid: int) -> ParsedMessage:
        """One message parsed the way the persister parses it (never raises on bad mail)."""
        return parse_message(self.fetch(uid))

    def _fetch(self, uids: list[int], items: tuple[str, ...]) -> dict[int, dict[bytes, Any]]:
        wanted = set(uids)
        with imap_errors(self._where()):
            return wire.uid_fetch(self.connector.client, wire.uid_set(uids), items,
                                  wanted=wanted.__contains__)

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


def number(value: Any) -> int | None:
    """A number from a response; FETCH MODSEQ comes as a parenthesized list: ``MODSEQ (12)``."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)
