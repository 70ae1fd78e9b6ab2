"""Watching a mailbox for changes over one connection: NOTIFY (RFC 5465), else IDLE (RFC 2177).

A :class:`PushSession` answers one question, over and over: *which of these folders changed?*

- ``notify``: the server offers NOTIFY. One ``NOTIFY SET STATUS`` names every watched folder;
  the server then sends a ``STATUS`` response whenever one of them gets, loses or re-flags mail
  (RFC 5465 section 5.1-5.3: for non-selected mailboxes the events arrive as STATUS), and at once
  the current STATUS of each (the ``STATUS`` indicator, section 6), which is the baseline. The
  connection sits in IDLE in the authenticated state meanwhile (renewed like any IDLE), so that
  the server's inactivity timer never closes it.
- ``idle``: IDLE on INBOX (or the first watched folder when INBOX is not one), where ``EXISTS``,
  ``EXPUNGE``, ``VANISHED`` and ``FETCH`` mean a change; the other folders are polled with
  ``STATUS`` every ``poll`` seconds (leaving IDLE for it).
- ``status``: no IDLE at all: every folder is polled with ``STATUS``.

A folder "changed" when a value of its STATUS (MESSAGES, UIDNEXT, UIDVALIDITY, UNSEEN and, with
CONDSTORE, HIGHESTMODSEQ: a flag change moves it, RFC 7162 section 3.1.2) differs from the last one
seen. The last values are kept by the caller across reconnections (``known``), so mail that came
while a watch was down is noticed by the first STATUS after it is back. Servers repeat unchanged
STATUS lines (Dovecot does after NOTIFY SET): those are no change.

IDLE is ended and sent again every ``renew`` seconds: RFC 2177 section 3 asks clients to do so
at least every 29 minutes, as servers may log an idle client off after 30.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Literal

from imapclient.response_parser import parse_response

from mailferry.errors import ImapProtocolError
from mailferry.imap import wire
from mailferry.imap.connection import ImapConnector, imap_errors

Mode = Literal["notify", "idle", "status"]
Status = dict[str, int]

_STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
_SELECTED_CHANGE = re.compile(rb"^\* (?:\d+ (?:EXISTS|EXPUNGE|FETCH)\b|VANISHED\b)", re.I)
_STATUS_LINE = re.compile(rb"^\* STATUS ", re.I)


def quoted(name: str) -> bytes | None:
    """A folder name as an IMAP quoted string (RFC 3501 section 9); None for a name that cannot
    be one (8-bit or a line break): such a folder is not watched and waits for the schedule."""
    if not name.isascii() or "\r" in name or "\n" in name or "\0" in name:
        return None
    return b'"' + name.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def parse_status(response: wire.Response) -> tuple[str, Status] | None:
    """``* STATUS name (ITEM n ...)`` as (raw name, {ITEM: n}); None for any other response."""
    first = response[0] if isinstance(response[0], bytes) else response[0][0]
    if not _STATUS_LINE.match(first):
        return None
    data: list[bytes | tuple[bytes, bytes]] = []
    for part in response:
        if isinstance(part, tuple):
            data.append((part[0][len(b"* STATUS "):] if not data else part[0], part[1]))
        else:
            data.append(part[len(b"* STATUS "):] if not data else part)
    try:
        parsed = parse_response(data)
    except Exception:  # a malformed line from an untrusted server: not a change we can read
        return None
    if len(parsed) != 2 or not isinstance(parsed[1], tuple):
        return None
    name = parsed[0]
    name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    items = parsed[1]
    values: Status = {}
    for key, value in zip(items[::2], items[1::2], strict=False):
        if isinstance(key, bytes) and isinstance(value, int):
            values[key.decode("ascii", "replace").upper()] = value
    return _folder_key(name), values


def _folder_key(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


def moved(old: Status | None, new: Status) -> bool:
    """Whether a folder's STATUS says it changed since ``old`` (the values both carry)."""
    if old is None:
        return False
    return any(old[key] != value for key, value in new.items() if key in old)


class PushSession:
    """One watching connection over a logged-in :class:`ImapConnector` (see the module doc).

    ``folders`` are raw names; ``known`` maps each to its last STATUS and is updated in place.
    Not thread-safe, except :meth:`interrupt`, which another thread calls to stop a wait."""

    def __init__(self, connector: ImapConnector, folders: Sequence[str], known: dict[str, Status],
                 *, poll: float, renew: float, use_notify: bool = True) -> None:
        self.connector = connector
        self.folders = [_folder_key(f) for f in folders if quoted(f) is not None]
        self.known = known
        self.poll = poll
        self.renew = renew
        self._use_notify = use_notify
        self.mode: Mode = "status"
        self._items: tuple[str, ...] = _STATUS_ITEMS
        self._idle_tag: bytes | None = None
        self._idle_until = 0.0
        self._next_poll = 0.0
        self._selected: str | None = None

    # --- setting up ------------------------------------------------------------------------

    def start(self) -> set[str]:
        """Choose the mode, take the baseline; returns the folders that moved since ``known``."""
        caps = self.connector.capabilities()
        with imap_errors(self.connector.where):
            if "CONDSTORE" in caps:
                self._items = (*_STATUS_ITEMS, "HIGHESTMODSEQ")
                self._command(b"ENABLE CONDSTORE")
            if self._use_notify and "NOTIFY" in caps and "IDLE" in caps and self.folders:
                changed = self._notify()
                if changed is not None:
                    self.mode = "notify"
                    return changed
            changed = self._poll(self.folders)
            if "IDLE" in caps and self.folders:
                self.mode = "idle"
                self._selected = "INBOX" if "INBOX" in self.folders else self.folders[0]
                self._command(b"EXAMINE " + (quoted(self._selected) or b'""'))
            else:
                self.mode = "status"
            self._next_poll = time.monotonic() + self.poll
            return changed

    def _notify(self) -> set[str] | None:
        names = b" ".join(q for f in self.folders if (q := quoted(f)) is not None)
        status, untagged = self._command(
            b"NOTIFY SET STATUS (mailboxes (" + names + b") (MessageNew MessageExpunge "
            b"FlagChange))", check=False)
        if not status.upper().startswith(b"OK"):
            return None  # refused (a filter it does not support): IDLE and STATUS instead
        return self._changes(untagged)

    # --- waiting ---------------------------------------------------------------------------

    def next_changes(self) -> set[str]:
        """Block until a folder changes or a poll or renewal is due; the folders that changed
        (often none: then call again)."""
        with imap_errors(self.connector.where):
            now = time.monotonic()
            changed: set[str] = set()
            if self.mode != "notify" and now >= self._next_poll:
                changed |= self._end_idle()
                others = self.folders if self.mode == "status" else [
                    f for f in self.folders if f != self._selected]
                changed |= self._poll(others)
                self._next_poll = now + self.poll
            if self.mode != "status":
                if self._idle_tag is not None and now >= self._idle_until:
                    changed |= self._end_idle()
                if self._idle_tag is None:
                    changed |= self._begin_idle()
            if changed:
                return changed
            wake = self._idle_until if self.mode == "notify" else min(
                self._next_poll, self._idle_until if self._idle_tag else self._next_poll)
            response = wire.wait_response(self.connector.client, wake - time.monotonic())
            return set() if response is None else self._changes([response])

    def interrupt(self) -> None:
        if self.connector.connected:
            wire.interrupt(self.connector.client)

    def stop(self) -> None:
        """Leave IDLE politely when possible (the connector logs out afterwards)."""
        try:
            with imap_errors(self.connector.where):
                if self.connector.usable:
                    self._end_idle()
        except Exception:  # closing anyway
            pass

    # --- commands --------------------------------------------------------------------------

    def _command(self, command: bytes, *, check: bool = True) -> tuple[bytes, list[wire.Response]]:
        client = self.connector.client
        status, untagged = wire.read_until_tagged(client, wire.send_tagged(client, command))
        if check and not status.upper().startswith(b"OK"):
            raise ImapProtocolError(f"{self.connector.where}: {command.split(b' ')[0].decode()} "
                                    f"refused: {status.decode('utf-8', 'replace')[:200]}")
        return status, untagged

    def _poll(self, folders: Sequence[str]) -> set[str]:
        changed: set[str] = set()
        items = b"(" + " ".join(self._items).encode() + b")"
        for folder in folders:
            name = quoted(folder)
            assert name is not None
            _status, untagged = self._command(b"STATUS " + name + b" " + items, check=False)
            changed |= self._changes(untagged)
        return changed

    def _begin_idle(self) -> set[str]:
        client = self.connector.client
        tag = wire.send_tagged(client, b"IDLE")
        status, untagged = wire.read_until_continuation(client, tag)
        if status is not None:
            raise ImapProtocolError(f"{self.connector.where}: IDLE refused: "
                                    f"{status.decode('utf-8', 'replace')[:200]}")
        self._idle_tag = tag
        self._idle_until = time.monotonic() + self.renew
        return self._changes(untagged)

    def _end_idle(self) -> set[str]:
        if self._idle_tag is None:
            return set()
        client = self.connector.client
        tag, self._idle_tag = self._idle_tag, None
        wire.send_continuation(client, b"DONE")
        _status, untagged = wire.read_until_tagged(client, tag)
        return self._changes(untagged)

    def _changes(self, responses: Sequence[wire.Response]) -> set[str]:
        changed: set[str] = set()
        watched = set(self.folders)
        for response in responses:
            first = response[0] if isinstance(response[0], bytes) else response[0][0]
            if self._selected is not None and _SELECTED_CHANGE.match(first):
                changed.add(self._selected)
                continue
            status = parse_status(response)
            if status is None or status[0] not in watched:
                continue
            name, values = status
            if moved(self.known.get(name), values):
                changed.add(name)
            self.known[name] = {**self.known.get(name, {}), **values}
        return changed
