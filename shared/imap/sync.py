"""What a sync asks of a server, in windows whose answers stay bounded whatever the folder holds.

A folder may hold a million messages (archives do): no command here asks for more than about
``window`` UIDs at once, so no answer line grows with the folder (imaplib's own line limit broke
``UID SEARCH`` at about 155,000 UIDs), and the caller's memory follows the window, not the folder.
Windows are UID ranges (``UID a:b``), which stay valid while messages come and go, sized from the
folder's density (EXISTS over the UID span) so that each holds about ``window`` messages.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from mailferry.imap import wire
from mailferry.imap.connection import ImapConnector, imap_errors
from mailferry.imap.folders import list_folders
from mailferry.imap.manager import FolderStatus, ImapEmailManager, number
from mailferry.imap.search import SearchQueryBuilder
from mailferry.messages import FolderInfo
from mailferry.mime import parse_message

WINDOW = 20_000  # UIDs a window aims at: a SEARCH answer line of about 220 KB
META_ITEMS = ("FLAGS", "INTERNALDATE", "RFC822.SIZE")
MESSAGE_ID = "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"


@dataclass(frozen=True)
class Extensions:
    condstore: bool  # SELECT reports HIGHESTMODSEQ, FETCH takes CHANGEDSINCE (RFC 7162 3.1)
    qresync: bool  # FETCH takes VANISHED: expunged UIDs without a UID diff (RFC 7162 3.2)


@dataclass(frozen=True)
class MessageMeta:
    uid: int
    flags: tuple[str, ...]  # without \Recent, which belongs to one session (RFC 3501 2.3.2)
    internal_date: datetime | None
    size: int  # RFC822.SIZE as the server declared it: a hint, never trusted for limits
    message_id: str | None = None  # only when asked for


@dataclass(frozen=True)
class FlagState:
    uid: int
    flags: tuple[str, ...]
    modseq: int | None


@dataclass(frozen=True)
class Body:
    """A message's bytes exactly as sent, or ``None`` when they exceeded the literal limit
    (read and dropped, whatever RFC822.SIZE claimed); ``size`` is what the server sent."""

    raw: bytes | None
    size: int


def uid_windows(low: int, high: int, exists: int, window: int = WINDOW) -> list[tuple[int, int]]:
    """Cover ``low..high`` with UID ranges expected to hold about ``window`` messages each,
    given ``exists`` messages in the folder (the density of its UID space)."""
    if high < low:
        return []
    span = high - low + 1
    if exists <= window:
        return [(low, high)]
    step = max(window, math.ceil(window * span / exists))
    return [(start, min(start + step - 1, high)) for start in range(low, high + 1, step)]


class Ranges:
    """Sorted, merged UID ranges (VANISHED answers): membership without expanding them."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        self._starts = [a for a, _ in merged]
        self._ranges = merged

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        i = bisect.bisect_right(self._starts, uid) - 1
        return i >= 0 and self._ranges[i][0] <= uid <= self._ranges[i][1]


class SyncSession:
    """One connected account, as a sync uses it. Every method raises ``ImapError`` subclasses
    only; after a deadline or an oversized answer the connector is no longer ``usable``."""

    def __init__(self, connector: ImapConnector, *, window: int = WINDOW) -> None:
        self.connector = connector
        self.window = window
        self._manager = ImapEmailManager(connector)
        self._extensions: Extensions | None = None

    @property
    def where(self) -> str:
        selected = self._manager.selected_folder
        return f"{self.connector.where} {selected}" if selected else self.connector.where

    def extensions(self) -> Extensions:
        """CONDSTORE and QRESYNC, enabled once when the server announces them (decided from
        CAPABILITY alone: some servers accept the commands without announcing them)."""
        if self._extensions is None:
            client = self.connector.client
            with imap_errors(self.connector.where):
                wanted = [ext for ext in ("CONDSTORE", "QRESYNC") if client.has_capability(ext)]
                if wanted:
                    client.enable(*wanted)
            self._extensions = Extensions(condstore=bool(wanted), qresync="QRESYNC" in wanted)
        return self._extensions

    def reconnect(self) -> None:
        """Log in again on a new connection (an OAuth2 token expired mid-sync) with the same
        extensions enabled; nothing is selected afterwards."""
        self.connector.close()
        self._manager = ImapEmailManager(self.connector)
        self._extensions = None
        self.connector.connect()
        self.extensions()

    def list_folders(self) -> list[FolderInfo]:
        return list_folders(self.connector)

    def uidvalidity(self, raw_name: str) -> int | None:
        """A folder's UIDVALIDITY without selecting it (STATUS, RFC 3501 6.3.10)."""
        with imap_errors(f"{self.connector.where} {raw_name}"):
            status = self.connector.client.folder_status(raw_name, ["UIDVALIDITY"])
        return number(status.get(b"UIDVALIDITY"))

    def select(self, folder: FolderInfo) -> FolderStatus:
        """EXAMINE: read-only, by the folder's raw name."""
        return self._manager.select_folder(folder)

    def search(self, low: int, high: int | None, since: date | None = None) -> list[int]:
        """UIDs in ``low:high`` (``high`` None: ``*``), optionally received since ``since``."""
        query = SearchQueryBuilder().uid(f"{low}:{high if high is not None else '*'}")
        if since is not None:
            query = query.since(since)
        charset, pieces = query.get().encode()
        with imap_errors(self.where):
            # ESEARCH (RFC 4731) answers with ranges: "1:20000" instead of 20,000 numbers.
            esearch = self.connector.client.has_capability("ESEARCH")
            found = wire.uid_search(self.connector.client, pieces, charset, self.where,
                                    esearch=esearch)
        # "n:*" matches the highest UID even when it is below n (RFC 3501 6.4.8).
        top = high if high is not None else math.inf
        return sorted(uid for uid in found if low <= uid <= top)

    def flags(self, low: int, high: int, *, changed_since: int | None,
              vanished: bool) -> tuple[list[FlagState], Ranges]:
        """Flags in ``low:high`` (only those changed since a MODSEQ with CONDSTORE), and with
        QRESYNC the UIDs expunged since then (``VANISHED (EARLIER)``, RFC 7162 3.2.6)."""
        client = self.connector.client
        condstore = self.extensions().condstore
        modifiers = [f"CHANGEDSINCE {changed_since}"] if changed_since is not None else []
        if vanished:
            modifiers.append("VANISHED")
            wire.pop_vanished(client)  # drop anything reported before this command
        items = ["FLAGS", "MODSEQ"] if condstore else ["FLAGS"]
        with imap_errors(self.where):
            data = wire.uid_fetch(client, f"{low}:{high}", items, modifiers,
                                  wanted=lambda uid: low <= uid <= high)
            gone = Ranges(wire.pop_vanished(client) if vanished else [])
        states = [FlagState(uid, clean_flags(info.get(b"FLAGS", ())), number(info.get(b"MODSEQ")))
                  for uid, info in sorted(data.items())]
        return states, gone

    def metadata(self, uids: list[int], *, message_ids: bool = False) -> dict[int, MessageMeta]:
        """Flags, arrival time and declared size; with ``message_ids`` the Message-ID header
        too (what recognises a stored message under a new UID)."""
        if not uids:
            return {}
        wanted = set(uids)
        items = (*META_ITEMS, MESSAGE_ID) if message_ids else META_ITEMS
        with imap_errors(self.where):
            data = wire.uid_fetch(self.connector.client, wire.uid_set(uids), items,
                                  wanted=wanted.__contains__)
        return {uid: MessageMeta(uid, clean_flags(info.get(b"FLAGS", ())),
                                 info.get(b"INTERNALDATE"), int(info.get(b"RFC822.SIZE", 0)),
                                 _message_id(info) if message_ids else None)
                for uid, info in data.items()}

    def personal_namespace(self) -> str:
        """The prefix of the account's own folders (NAMESPACE, RFC 2342): ``INBOX.`` on
        Courier and Cyrus, empty on Dovecot, Gmail and Exchange (or without NAMESPACE)."""
        client = self.connector.client
        with imap_errors(self.connector.where):
            if not client.has_capability("NAMESPACE"):
                return ""
            personal = client.namespace().personal
        if not personal:
            return ""
        prefix = personal[0][0]
        return prefix.decode("utf-8", "replace") if isinstance(prefix, bytes) else str(prefix)

    def recent_message_ids(self, folder: FolderInfo, count: int) -> set[str]:
        """The Message-IDs of a folder's last ``count`` messages (by sequence number)."""
        status = self.select(folder)
        if not status.exists:
            return set()
        first = max(1, status.exists - count + 1)
        with imap_errors(self.where):
            data = wire.fetch_sequence(self.connector.client, f"{first}:*", [MESSAGE_ID])
        return {mid for info in data.values() if (mid := _message_id(info))}

    def bodies(self, uids: list[int]) -> dict[int, Body]:
        """``BODY.PEEK[]`` (never sets \\Seen); messages expunged meanwhile are absent."""
        if not uids:
            return {}
        wanted = set(uids)
        with imap_errors(self.where):
            data = wire.uid_fetch(self.connector.client, wire.uid_set(uids), ("BODY.PEEK[]",),
                                  wanted=wanted.__contains__)
        out: dict[int, Body] = {}
        for uid, info in data.items():
            body = info.get(b"BODY[]")
            if isinstance(body, wire.SkippedLiteral):
                out[uid] = Body(None, body.size)
            elif body is not None:
                out[uid] = Body(bytes(body), len(body))
        return out

    def iter_windows(self, low: int, status: FolderStatus) -> Iterator[tuple[int, int]]:
        """The UID windows of ``low`` and above that the folder may hold messages in: none
        when it is empty, whatever its UIDNEXT says."""
        if not status.exists:
            return
        high = (status.uidnext or 0) - 1
        if high < low:
            # No UIDNEXT (or it lies): one open window, bounded by what the folder holds.
            yield from ([(low, 2**32 - 1)] if status.uidnext is None else [])
            return
        yield from uid_windows(low, high, status.exists, self.window)


def _message_id(info: dict[bytes, Any]) -> str | None:
    """The Message-ID as the store keeps it (parsed the persister's way)."""
    header = next((bytes(v) for k, v in info.items() if k.startswith(b"BODY[HEADER")), b"")
    return parse_message(header + b"\r\n").message_id if header.strip() else None


def clean_flags(flags: Any) -> tuple[str, ...]:
    # \Recent belongs to one IMAP session (RFC 3501 section 2.3.2): not a stored fact.
    return tuple(f for f in map(_flag, flags) if f.lower() != "\\recent")


def _flag(flag: bytes | str) -> str:
    return flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)
