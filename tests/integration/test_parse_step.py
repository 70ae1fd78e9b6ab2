"""The parse step against a real PostgreSQL: mail a first sync stored with its raw bytes only is
parsed afterwards, by a persister's background thread or by whoever reads it first, survives a
crash mid-batch, and never stops on hostile mail."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from mailferry import app, db, outbox, parsing
from mailferry.devkit import services
from mailferry.messages import FetchedMessage, MessagesFetched
from mailferry.search import search_messages
from mailferry.services.persister.handlers import PersisterDeps, handle
from mailferry.services.persister.indexer import Parser

NOW = datetime(2026, 11, 1, tzinfo=UTC)
_uids = itertools.count(1)


@pytest.fixture
def deps(database_url: str) -> PersisterDeps:
    return PersisterDeps(connection=db.Reconnecting(database_url))


def _first_sync(conn: db.Connection, deps: PersisterDeps, *raws: bytes) -> int:
    """A mailbox whose first sync stored ``raws`` in INBOX (no checkpoint yet: backfill)."""
    mailbox_id = services.mailbox_row(conn)
    run_id = uuid.uuid4()
    # folders_listed: the run's listing counts as stored, so its mail waits for none
    conn.execute("INSERT INTO sync_runs (id, mailbox_id, status, requested_by, folders_listed) "
                 "VALUES (%s, %s, 'queued', 'test', true)", (run_id, mailbox_id))
    handle(MessagesFetched(run_id=run_id, mailbox_id=mailbox_id, lease_token=1, folder="INBOX",
                           uidvalidity=1, batch_no=0, messages=tuple(
                               FetchedMessage(uid=next(_uids), internal_date=NOW, size=len(raw),
                                              raw=raw) for raw in raws)), deps)
    return mailbox_id


def _mail(subject: str, body: str = "hello") -> bytes:
    return (f"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@x>\r\n\r\n{body}\r\n").encode()


def _subjects(conn: db.Connection, mailbox_id: int) -> list[tuple[Any, bool]]:
    return [(m["subject"], m["parsed"]) for m in app.list_messages(conn, mailbox_id)]


def test_a_first_sync_lists_its_mail_at_once_and_its_parsed_fields_once_parsed(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = _first_sync(conn, deps, _mail("one"), _mail("two"))
    assert _subjects(conn, mailbox_id) == [(None, False), (None, False)]
    assert parsing.unparsed(conn, mailbox_id) == 2

    assert services.parse_stored(conn) == 2
    assert _subjects(conn, mailbox_id) == [("one", True), ("two", True)]
    row = conn.execute("SELECT from_addr, to_addrs, body_text, message_id FROM messages "
                       "WHERE subject = 'one'").fetchone()
    assert row == {"from_addr": "Alice <alice@example.com>", "to_addrs": ["bob@example.org"],
                   "body_text": "hello\r\n", "message_id": "one@x"}


def test_the_background_parse_step_waits_while_events_flow_then_catches_up(
    conn: db.Connection, deps: PersisterDeps, database_url: str,
) -> None:
    mailbox_id = _first_sync(conn, deps, *[_mail(f"note {n}") for n in range(3)])
    last_event = [time.monotonic() + 3600.0]  # an event "just now", for the next hour
    parser = Parser(database_url, lambda: last_event[0])
    parser.start()
    try:
        time.sleep(2.5)
        assert parsing.unparsed(conn, mailbox_id) == 3, "parsed while the persister was busy"
        last_event[0] = 0.0  # the queue has gone quiet
        assert services.eventually(lambda: parsing.unparsed(conn, mailbox_id) == 0, timeout=30)
    finally:
        parser.stop()
    assert sorted(s for s, _ in _subjects(conn, mailbox_id)) == ["note 0", "note 1", "note 2"]


def test_a_parse_step_that_dies_mid_batch_leaves_its_messages_to_the_next_one(
    conn: db.Connection, deps: PersisterDeps, database_url: str,
) -> None:
    mailbox_id = _first_sync(conn, deps, _mail("held"), _mail("free"))
    dying = db.connect(database_url)
    # a parse step claimed the first message, and its process dies before it commits
    dying.execute("SELECT id FROM messages WHERE parsed_at IS NULL ORDER BY id LIMIT 1 "
                  "FOR UPDATE SKIP LOCKED")
    assert parsing.parse_pending(conn) == 1  # another step skips what is held, never waits
    dying.close()  # PostgreSQL rolls its transaction back

    assert parsing.parse_pending(conn) == 1
    assert parsing.parse_pending(conn) == 0
    assert _subjects(conn, mailbox_id) == [("held", True), ("free", True)]
    parsed = [c for c in outbox.since(conn, 0, mailbox_id) if c["type"] == "MessageParsed"]
    assert sorted(c["subject"] for c in parsed) == ["free", "held"]  # each announced once


def test_hostile_mail_parsed_later_keeps_its_bytes_and_records_what_is_wrong(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    hostile = b"\x00\xff\xfeSubject: \x00bad\xc3(\r\nContent-Type: multipart/mixed\r\n\r\n\x00"
    mailbox_id = _first_sync(conn, deps, hostile)
    assert services.parse_stored(conn) == 1
    row = conn.execute("SELECT g.subject, g.parse_errors, g.parsed_at, r.data FROM messages g "
                       "JOIN raw_messages r USING (sha256) WHERE g.mailbox_id = %s",
                       (mailbox_id,)).fetchone()
    assert row is not None and bytes(row["data"]) == hostile
    assert row["parse_errors"] and row["parsed_at"] is not None
    assert "\x00" not in (row["subject"] or "")


def test_a_search_right_after_a_first_sync_parses_and_finds_its_mail(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = _first_sync(conn, deps, _mail("quarterly invoice"), _mail("lunch"))
    hits = search_messages(conn, mailbox_id, "invoice")
    assert [h.subject for h in hits] == ["quarterly invoice"]
    assert parsing.unparsed(conn, mailbox_id) == 0
