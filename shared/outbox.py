"""The change outbox: what integrators learn, written in the transaction that made the change.

DESIGN invariant 10: changes are announced exactly as stored. So nothing here guesses from the
events the persister receives; it compares the store before and after a write (a snapshot of the
rows an event touches, read in the same transaction) and describes the difference. A duplicate
or replayed event changes nothing in the store, so it announces nothing (invariant 2).

::

    before = outbox.messages_before(conn, ...)    # rows the event will touch, as they are
    store.store_messages(conn, ...)               # the write (services/persister/store.py)
    changes += outbox.message_changes(conn, ...)  # what really changed, as change events
    ...
    outbox.append(conn, mailbox_id, changes)      # last: numbers them under the mailbox lock

:func:`append` takes the mailbox row's lock, the last lock of the persister's one order
(folders -> run -> mailbox, ``shared/runs.py``); every writer of a mailbox's changes holds it
until commit, so the sequence numbers are gap-free and in commit order, and two writers of the
same change (the same event delivered to two persisters at once) cannot both write it: the
second one sees the first one's row (same stable ``event_id``) and skips it.

Stable ids: a change's id is a UUID 5 of what identifies it (mailbox, folder, UIDVALIDITY, UID,
and for flags the MODSEQ, or without CONDSTORE the attempt's fencing token and the flags), so a
consumer that sees one twice (the relay republishes after a crash) recognises it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailferry import repository
from mailferry.db import Connection
from mailferry.messages import (
    ChangeEvent,
    FolderCreated,
    FolderDeleted,
    FolderRenamed,
    MessageExpunged,
    MessageFlagsChanged,
    MessageParsed,
    MessageStored,
)

#: The namespace of change ids (uuid5); never change it, or every id changes.
NAMESPACE = uuid.UUID("0b9c3c35-7f7e-4c43-9a37-6d61696c6665")
#: The relay LISTENs on this channel; a transaction that appends notifies it at commit.
CHANNEL = "mailferry_changes"


def change_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, "/".join(str(p) for p in parts))


@dataclass(frozen=True)
class Change:
    """A change event before its sequence number is known."""

    id: uuid.UUID
    model: type[ChangeEvent]
    fields: dict[str, Any] = field(default_factory=dict)


def append(conn: Connection, mailbox_id: int, changes: Sequence[Change]) -> int:
    """Number ``changes`` and write them; returns how many were new. Call it last in the
    transaction: it locks the mailbox row (see the module docstring)."""
    if not changes:
        return 0
    row = conn.execute("SELECT change_seq, now() AS now FROM mailboxes WHERE id = %s FOR UPDATE",
                       (mailbox_id,)).fetchone()
    if row is None:
        return 0
    ids = [c.id for c in changes]
    seen = {r["event_id"] for r in conn.execute(
        "SELECT event_id FROM change_outbox WHERE event_id = ANY(%s)", (ids,)).fetchall()}
    seq = int(row["change_seq"])
    rows = []
    for change in changes:
        if change.id in seen:
            continue
        seen.add(change.id)
        seq += 1
        event = change.model(id=change.id, mailbox_id=mailbox_id, seq=seq,
                             occurred_at=row["now"], **change.fields)
        # pydantic's own JSON (compiled), handed to COPY as text: PostgreSQL parses it as jsonb
        rows.append((change.id, mailbox_id, seq, change.model.model_fields["type"].default,
                     event.model_dump_json()))
    if not rows:
        return 0
    with conn.cursor() as cur, cur.copy(
            "COPY change_outbox (event_id, mailbox_id, seq, type, payload) FROM STDIN") as copy:
        for values in rows:  # a first sync writes a batch's worth at once: COPY, not INSERTs
            copy.write_row(values)
    conn.execute("UPDATE mailboxes SET change_seq = %s WHERE id = %s", (seq, mailbox_id))
    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    return len(rows)


# --- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    flags: tuple[str, ...]
    modseq: int | None
    expunged: bool


@dataclass(frozen=True)
class MessagesBefore:
    """The placements an event touches and the bytes the mailbox held, before the write."""

    placements: dict[int, Placement]
    known: set[bytes]


def messages_before(conn: Connection, mailbox_id: int, folder_id: int, uidvalidity: int,
                    uids: Iterable[int], hashes: Iterable[bytes] = ()) -> MessagesBefore:
    # One primary-key probe per UID (a folder in its first sync is new to the statistics, and
    # ``uid = ANY(...)`` was planned as a scan of the whole folder: see
    # repository.messages_by_hash).
    rows = conn.execute(
        """SELECT mf.uid, mf.flags, mf.modseq, mf.expunged_at IS NOT NULL AS expunged
             FROM unnest(%s::bigint[]) AS u(uid),
                  LATERAL (SELECT * FROM message_folders
                            WHERE folder_id = %s AND uidvalidity = %s AND uid = u.uid
                            LIMIT 1) AS mf""",
        (sorted(set(uids)), folder_id, uidvalidity)).fetchall()
    hashes = list(hashes)
    known = set(repository.messages_by_hash(conn, mailbox_id, hashes)) if hashes else set()
    return MessagesBefore(
        {int(r["uid"]): Placement(tuple(r["flags"]), r["modseq"], r["expunged"]) for r in rows},
        known)


def message_changes(conn: Connection, mailbox_id: int, folder_id: int, uidvalidity: int,
                    uids: Iterable[int], before: MessagesBefore, token: int) -> list[Change]:
    """MessageStored, MessageFlagsChanged and MessageExpunged for the placements that changed.

    ``backfill`` (DESIGN invariant 10: old mail is never announced as new): the folder has no
    checkpoint under this UIDVALIDITY yet (its first sync, or a UIDVALIDITY reset), or the UID is
    at or below its checkpoint (a re-scan, ``sync --force``, storing what an earlier window
    left out). Mail above the checkpoint is new, even in a forced run."""
    rows = conn.execute(
        """SELECT mf.uid, mf.flags, mf.modseq, mf.expunged_at IS NOT NULL AS expunged,
                  mf.internal_date, mf.size, mf.skipped_reason, mf.message_id AS ref,
                  m.message_id, m.subject, m.from_addr, m.sent_at, m.sha256,
                  (m.id IS NULL OR m.parsed_at IS NOT NULL) AS parsed,
                  f.name AS folder, f.uidvalidity AS checkpoint, f.last_uid
             FROM unnest(%s::bigint[]) AS u(uid)
             CROSS JOIN LATERAL (SELECT * FROM message_folders
                                  WHERE folder_id = %s AND uidvalidity = %s AND uid = u.uid
                                  LIMIT 1) AS mf
             JOIN folders f ON f.id = mf.folder_id
             LEFT JOIN messages m ON m.id = mf.message_id
            ORDER BY mf.uid""",
        (sorted(set(uids)), folder_id, uidvalidity)).fetchall()
    changes = []
    for r in rows:
        uid, old = int(r["uid"]), before.placements.get(int(r["uid"]))
        where = {"folder": r["folder"], "folder_id": folder_id, "uidvalidity": uidvalidity,
                 "uid": uid}
        if old is None:
            if r["expunged"]:
                continue  # a tombstone for mail never stored: nothing anyone saw
            sha = bytes(r["sha256"]) if r["sha256"] is not None else None
            changes.append(Change(
                change_id(mailbox_id, folder_id, uidvalidity, uid, "stored"), MessageStored, {
                    **where, "modseq": r["modseq"], "message_ref": r["ref"],
                    "message_id": r["message_id"], "subject": r["subject"],
                    "from": r["from_addr"], "date": r["sent_at"],
                    "internal_date": r["internal_date"], "flags": tuple(r["flags"]),
                    "size": r["size"], "sha256": sha.hex() if sha else None,
                    "backfill": r["checkpoint"] != uidvalidity or uid <= r["last_uid"],
                    "known": sha in before.known, "skipped_reason": r["skipped_reason"],
                    "parsed": r["parsed"]}))
        elif old.expunged:
            continue
        elif r["expunged"]:
            changes.append(Change(change_id(mailbox_id, folder_id, uidvalidity, uid, "expunged"),
                                  MessageExpunged, {**where, "message_ref": r["ref"]}))
        elif tuple(r["flags"]) != old.flags or r["modseq"] != old.modseq:
            flags = tuple(r["flags"])
            # MODSEQ names one state of a message's flags (RFC 7162 3.1); without CONDSTORE,
            # the attempt that read them and what they are do.
            version = (f"modseq:{r['modseq']}" if r["modseq"] is not None
                       else f"token:{token}:{' '.join(sorted(flags))}")
            changes.append(Change(
                change_id(mailbox_id, folder_id, uidvalidity, uid, "flags", version),
                MessageFlagsChanged, {**where, "modseq": r["modseq"], "flags": flags,
                                      "previous_flags": old.flags, "message_ref": r["ref"]}))
    return changes


def parsed(mailbox_id: int, rows: Sequence[dict[str, Any]]) -> list[Change]:
    """MessageParsed for messages the parse step just filled in (``rows``: id, message_id,
    subject, from_addr, sent_at, sha256, parse_errors of each). One per message: its
    placements were announced by MessageStored with ``parsed: false``."""
    return [Change(change_id(mailbox_id, "message", r["id"], "parsed"), MessageParsed, {
                "message_ref": r["id"], "message_id": r["message_id"], "subject": r["subject"],
                "from": r["from_addr"], "date": r["sent_at"], "sha256": bytes(r["sha256"]).hex(),
                "parse_errors": len(r["parse_errors"])})
            for r in sorted(rows, key=lambda r: r["id"])]


def expunged_by_reset(mailbox_id: int, rows: Sequence[dict[str, Any]]) -> list[Change]:
    """MessageExpunged for the placements a new UIDVALIDITY made tombstones of (their UIDs name
    nothing any more, RFC 3501 2.3.1.1); ``rows``: folder_id, folder, uidvalidity, uid,
    message_id of each. The mail comes again under the new UIDVALIDITY as backfill."""
    return [Change(change_id(mailbox_id, r["folder_id"], r["uidvalidity"], r["uid"], "expunged"),
                   MessageExpunged, {"folder": r["folder"], "folder_id": r["folder_id"],
                                     "uidvalidity": r["uidvalidity"], "uid": r["uid"],
                                     "message_ref": r["message_id"]})
            for r in sorted(rows, key=lambda r: r["uid"])]


# --- folders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderRow:
    name: str
    raw_name: str
    gone: bool


def folders_before(conn: Connection, mailbox_id: int) -> dict[int, FolderRow]:
    return {int(r["id"]): FolderRow(r["name"], r["raw_name"], r["gone"]) for r in conn.execute(
        """SELECT id, name, raw_name, gone_at IS NOT NULL AS gone FROM folders
            WHERE mailbox_id = %s""", (mailbox_id,)).fetchall()}


def folder_changes(conn: Connection, mailbox_id: int, before: dict[int, FolderRow],
                   attempt: str) -> list[Change]:
    """FolderCreated (once per folder), FolderRenamed and FolderDeleted, after a listing was
    stored. ``attempt`` (run and fencing token) tells two renames of one folder apart. The
    folder rows are locked already (the listing wrote them), so the lock order holds."""
    rows = conn.execute(
        """SELECT id, name, raw_name, type, sync_enabled, gone_at IS NOT NULL AS gone,
                  announced_at IS NULL AS unannounced
             FROM folders WHERE mailbox_id = %s ORDER BY id""", (mailbox_id,)).fetchall()
    changes, announced = [], []
    for r in rows:
        fid, old = int(r["id"]), before.get(int(r["id"]))
        if r["unannounced"] and not r["gone"]:
            announced.append(fid)
            changes.append(Change(change_id(mailbox_id, "folder", fid, "created"), FolderCreated,
                                  {"folder": r["name"], "folder_id": fid,
                                   "folder_type": r["type"], "sync_enabled": r["sync_enabled"]}))
        elif old is not None and old.raw_name != r["raw_name"]:
            changes.append(Change(
                change_id(mailbox_id, "folder", fid, "renamed", old.raw_name, r["raw_name"],
                          attempt),
                FolderRenamed, {"folder": r["name"], "folder_id": fid,
                                "previous_name": old.name}))
        if old is not None and r["gone"] and not old.gone:
            changes.append(Change(change_id(mailbox_id, "folder", fid, "gone", attempt),
                                  FolderDeleted, {"folder": r["name"], "folder_id": fid,
                                                  "kept": True}))
    after = {int(r["id"]) for r in rows}
    for fid, old in sorted(before.items()):
        if fid not in after:
            changes.append(Change(change_id(mailbox_id, "folder", fid, "deleted"), FolderDeleted,
                                  {"folder": old.name, "folder_id": fid, "kept": False}))
    if announced:
        conn.execute("UPDATE folders SET announced_at = now() WHERE id = ANY(%s)", (announced,))
    return changes


# --- reading the stream back ---------------------------------------------------------------------


def since(conn: Connection, seq: int, mailbox_id: int | None = None,
          limit: int = 1000) -> list[dict[str, Any]]:
    """Events after ``seq`` (each mailbox's own sequence), oldest first, as published."""
    rows = conn.execute(
        """SELECT payload FROM change_outbox
            WHERE seq > %s AND (%s::bigint IS NULL OR mailbox_id = %s)
            ORDER BY mailbox_id, seq LIMIT %s""",
        (seq, mailbox_id, mailbox_id, limit)).fetchall()
    return [r["payload"] for r in rows]


def pending(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """Rows not yet confirmed by the broker, in the order they were committed per mailbox."""
    return conn.execute(
        """SELECT id, mailbox_id, type, payload FROM change_outbox
            WHERE published_at IS NULL ORDER BY id LIMIT %s""", (limit,)).fetchall()


def published(conn: Connection, ids: Sequence[int]) -> None:
    conn.execute("UPDATE change_outbox SET published_at = now() WHERE id = ANY(%s)", (list(ids),))


def prune(conn: Connection, retention_seconds: float) -> int:
    """Delete published rows older than the retention; rows not yet published are kept."""
    return conn.execute(
        """DELETE FROM change_outbox WHERE published_at IS NOT NULL
              AND created_at < now() - make_interval(secs => %s)""",
        (retention_seconds,)).rowcount
