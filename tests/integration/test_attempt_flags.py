"""Flags stored by an attempt that was taken over (its fetcher crashed or stalled after some of
its batches were stored) are replaced by the newer attempt's, which read the server later; the
older attempt's never replace the newer one's. Found by tests/e2e/test_faults.py (the frozen
fetcher): the newer attempt's insert of an already placed UID used to be a no-op, so the store
kept the older flags until the next run's flag pass."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from mailferry import db
from mailferry.messages import FetchedMessage, MessagesExpunged, MessagesFetched, SyncStarted
from mailferry.services.fetcher import lease as leases
from mailferry.services.persister import store
from mailferry.services.persister.handlers import PersisterDeps, handle

NOW = datetime(2026, 11, 1, tzinfo=UTC)
RAW = b"Subject: one\r\n\r\nbody\r\n"


@pytest.fixture
def deps(database_url: str) -> PersisterDeps:
    return PersisterDeps(connection=db.Reconnecting(database_url))


def _mailbox_and_run(conn: db.Connection) -> tuple[int, uuid.UUID]:
    row = conn.execute(
        """INSERT INTO mailboxes (name, host, port, security, username, password_encrypted)
           VALUES ('m', 'h', 993, 'ssl', 'u', '\\x00') RETURNING id""").fetchone()
    assert row is not None
    run_id = uuid.uuid4()
    # folders_listed: the run's listing counts as stored, so its mail waits for none
    conn.execute("INSERT INTO sync_runs (id, mailbox_id, status, requested_by, folders_listed) "
                 "VALUES (%s, %s, 'queued', 'test', true)", (run_id, row["id"]))
    return int(row["id"]), run_id


def _take_lease(conn: db.Connection, mailbox_id: int) -> int:
    row = conn.execute("UPDATE mailboxes SET lease_token = lease_token + 1 WHERE id = %s "
                       "RETURNING lease_token", (mailbox_id,)).fetchone()
    assert row is not None
    return int(row["lease_token"])


def _fetched(common: dict[str, Any], flags: tuple[str, ...], uid: int = 1) -> MessagesFetched:
    return MessagesFetched(**common, folder="INBOX", uidvalidity=7, batch_no=0,
                           messages=(FetchedMessage(uid=uid, flags=flags, internal_date=NOW,
                                                    size=len(RAW), raw=RAW),))


def _flags(conn: db.Connection) -> list[dict[str, Any]]:
    return conn.execute("SELECT uid, flags, flags_token, expunged_at IS NOT NULL AS gone "
                        "FROM message_folders ORDER BY uid").fetchall()


def test_a_newer_attempt_replaces_the_flags_an_older_attempt_stored(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id, run_id = _mailbox_and_run(conn)
    older = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": _take_lease(conn, mailbox_id)}
    handle(SyncStarted(**older, fetcher="a", started_at=NOW), deps)
    handle(_fetched(older, ()), deps)
    newer = {**older, "lease_token": _take_lease(conn, mailbox_id)}  # A's lease was taken over
    handle(SyncStarted(**newer, fetcher="b", started_at=NOW), deps)
    handle(_fetched(newer, ("\\Seen",)), deps)
    assert _flags(conn) == [{"uid": 1, "flags": ["\\Seen"], "flags_token": newer["lease_token"],
                             "gone": False}]
    handle(_fetched(newer, ("\\Seen",)), deps)  # a redelivery changes nothing
    handle(_fetched(older, ()), deps)  # a late event of the older attempt is refused
    assert _flags(conn) == [{"uid": 1, "flags": ["\\Seen"], "flags_token": newer["lease_token"],
                             "gone": False}]


def test_an_older_attempt_insert_never_replaces_newer_flags_nor_revives_a_tombstone(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id, run_id = _mailbox_and_run(conn)
    token = _take_lease(conn, mailbox_id)
    common = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": token}
    handle(_fetched(common, ("\\Flagged",)), deps)
    # The same attempt's duplicate with other flags (e.g. a --force re-scan) does not flip-flop.
    handle(_fetched(common, ()), deps)
    handle(MessagesExpunged(**common, folder="INBOX", uidvalidity=7, batch_no=1, uids=(2,)), deps)
    newer = {**common, "lease_token": _take_lease(conn, mailbox_id)}
    handle(_fetched(newer, ("\\Seen",), uid=2), deps)  # expunged already: stays a tombstone
    rows = _flags(conn)
    assert rows[0] == {"uid": 1, "flags": ["\\Flagged"], "flags_token": token, "gone": False}
    assert rows[1]["gone"] is True and rows[1]["flags"] == []


def test_a_takeover_waits_for_the_write_in_flight_so_no_older_write_lands_after_it(
    database_url: str, conn: db.Connection
) -> None:
    mailbox_id, _ = _mailbox_and_run(conn)
    old = _take_lease(conn, mailbox_id)
    writer = db.connect(database_url)  # a persister in the middle of an event's transaction
    taken: list[int] = []
    taker = db.connect(database_url, autocommit=True)
    thread = threading.Thread(
        target=lambda: taken.append(leases.acquire(taker, mailbox_id, "fetcher-b", 30)))
    try:
        with writer.transaction():
            assert store.current_token(writer, mailbox_id) == old  # its events pass the fence
            thread.start()
            thread.join(1.0)
            assert taken == [], "the lease was taken over while an older write was in flight"
        thread.join(10)
        assert taken == [old + 1]
        with writer.transaction():  # a write that starts after the takeover is fenced
            assert store.current_token(writer, mailbox_id) == old + 1
    finally:
        thread.join(10)
        writer.close()
        taker.close()
