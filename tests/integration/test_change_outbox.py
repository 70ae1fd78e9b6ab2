"""The change outbox against a real PostgreSQL and RabbitMQ: what the persister stores is
announced once, numbered gap-free per mailbox, with ids stable across replays, old mail flagged
``backfill``; the relay publishes it in order and marks it only after RabbitMQ confirmed it."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from kombu.connection import Connection
from kombu.entity import Queue

from mailferry import db, outbox, runs, topology
from mailferry.broker import Publisher
from mailferry.devkit import services
from mailferry.errors import ErrorKind
from mailferry.messages import (
    FetchedMessage,
    FlagChange,
    FlagsChanged,
    FolderInfo,
    FoldersListed,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
    SyncFailed,
    SyncFinished,
    SyncStarted,
    decode_change,
)
from mailferry.services.persister.handlers import PersisterDeps, handle
from mailferry.services.persister.relay import publish_pending

NOW = datetime(2026, 11, 1, tzinfo=UTC)
INBOX = FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox")
WORK = FolderInfo(name="Work", raw_name="Work", delimiter="/", uidvalidity=3)


@pytest.fixture
def deps(database_url: str) -> PersisterDeps:
    return PersisterDeps(connection=db.Reconnecting(database_url))


def _run(conn: db.Connection, mailbox_id: int) -> uuid.UUID:
    run_id = uuid.uuid4()
    runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False, requested_by="test",
                 run_id=run_id)
    return run_id


def _message(uid: int, flags: tuple[str, ...] = ()) -> FetchedMessage:
    raw = (f"From: alice@example.com\r\nSubject: message {uid}\r\nMessage-ID: <{uid}@x>\r\n"
           f"\r\nbody {uid}\r\n").encode()
    return FetchedMessage(uid=uid, flags=flags, internal_date=NOW, size=len(raw), raw=raw)


def _sync(mailbox_id: int, run_id: uuid.UUID, token: int, *batches: Any,
          folders: tuple[FolderInfo, ...] = (INBOX, WORK), last_uid: int = 0) -> list[Any]:
    """One attempt: the listing, ``batches`` of INBOX (messages, flags or expunges), its close."""
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": token}
    events: list[Any] = [SyncStarted(**common, fetcher="t", started_at=NOW),
                         FoldersListed(**common, folders=folders, first_listing=token == 1)]
    for no, batch in enumerate(batches):
        where = {**common, "folder": "INBOX", "uidvalidity": 7, "batch_no": no}
        if isinstance(batch[0], FetchedMessage):
            events.append(MessagesFetched(**where, messages=tuple(batch)))
        elif isinstance(batch[0], FlagChange):
            events.append(FlagsChanged(**where, changes=tuple(batch)))
        else:
            events.append(MessagesExpunged(**where, uids=tuple(batch)))
    events += [FolderSynced(**common, folder="INBOX", uidvalidity=7, uidnext=last_uid + 1,
                            last_uid=last_uid, batches=len(batches), messages=0),
               SyncFinished(**common, folders=1, finished_at=NOW)]
    return events


def _changes(conn: db.Connection, mailbox_id: int) -> list[dict[str, Any]]:
    return outbox.since(conn, 0, mailbox_id)


def _apply(events: list[Any], deps: PersisterDeps) -> None:
    for event in events:
        handle(event, deps)


def test_a_first_sync_announces_each_folder_and_message_once_as_backfill_even_when_replayed(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = services.mailbox_row(conn)
    events = _sync(mailbox_id, _run(conn, mailbox_id), 1,
                   [_message(1, ("\\Seen",)), _message(2)], [_message(3)], last_uid=3)
    _apply(events, deps)
    first = _changes(conn, mailbox_id)
    # every event again, in any order (redeliveries, several persisters): nothing new to tell
    replay = events * 2
    random.Random(1).shuffle(replay)
    _apply(replay, deps)

    assert _changes(conn, mailbox_id) == first
    assert [c["seq"] for c in first] == list(range(1, len(first) + 1))
    assert [(c["type"], c.get("folder"), c.get("uid")) for c in first] == [
        ("FolderCreated", "INBOX", None), ("FolderCreated", "Work", None),
        ("MessageStored", "INBOX", 1), ("MessageStored", "INBOX", 2),
        ("MessageStored", "INBOX", 3)]
    stored = [decode_change(c) for c in first[2:]]
    assert all(getattr(s, "backfill", None) is True for s in stored)
    # stored before it is parsed: what is known of the placement now, and the Message-ID (read
    # from the header alone), the other headers null
    assert (first[2]["parsed"], first[2]["subject"], first[2]["message_id"]) == (False, None, "1@x")
    assert first[2]["flags"] == ["\\Seen"] and first[2]["sha256"]
    assert "body" not in first[2] and "raw" not in first[2]


def test_a_message_stored_unparsed_is_announced_once_more_when_parsed_with_its_headers(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = services.mailbox_row(conn)
    _apply(_sync(mailbox_id, _run(conn, mailbox_id), 1, [_message(1), _message(2)],
                 last_uid=2), deps)
    stored = _changes(conn, mailbox_id)[2:]
    assert services.parse_stored(conn) == 2
    assert services.parse_stored(conn) == 0  # parsed once: nothing left for another step

    parsed = _changes(conn, mailbox_id)[len(stored) + 2:]
    assert [(c["type"], c["message_ref"]) for c in parsed] == [
        ("MessageParsed", s["message_ref"]) for s in stored]
    first = decode_change(parsed[0])
    assert first.model_dump(include={"subject", "from_", "message_id", "sha256",
                                     "parse_errors"}) == {
        "subject": "message 1", "from": "alice@example.com", "message_id": "1@x",
        "sha256": stored[0]["sha256"], "parse_errors": 0}
    assert [c["seq"] for c in _changes(conn, mailbox_id)] == list(
        range(1, len(stored) + len(parsed) + 3))


def test_after_the_first_sync_new_mail_flags_expunges_and_folder_changes_are_announced(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = services.mailbox_row(conn)
    _apply(_sync(mailbox_id, _run(conn, mailbox_id), 1, [_message(1), _message(2)],
                 last_uid=2), deps)
    before = len(_changes(conn, mailbox_id))
    conn.execute("UPDATE folders SET uidvalidity = 3 WHERE raw_name = 'Work'")  # as if synced
    renamed = FolderInfo(name="Projects", raw_name="Projects", delimiter="/", uidvalidity=3)
    second = _sync(mailbox_id, _run(conn, mailbox_id), 2,
                   [_message(3)], [FlagChange(uid=1, flags=("\\Flagged",))], [2],
                   folders=(INBOX, renamed), last_uid=3)
    _apply(second, deps)
    _apply(second, deps)  # a replay tells nothing new

    news = _changes(conn, mailbox_id)[before:]
    assert [(c["type"], c.get("uid")) for c in news] == [
        ("FolderRenamed", None), ("MessageStored", 3), ("MessageFlagsChanged", 1),
        ("MessageExpunged", 2)]
    assert news[0]["folder"] == "Projects" and news[0]["previous_name"] == "Work"
    assert news[1]["backfill"] is False
    # new mail is parsed as it is stored: announced with its headers at once
    assert (news[1]["parsed"], news[1]["subject"]) == (True, "message 3")
    assert news[2]["flags"] == ["\\Flagged"] and news[2]["previous_flags"] == []
    assert [c["seq"] for c in news] == list(range(before + 1, before + 5))


def test_a_refused_login_is_announced_once_and_a_completed_run_announces_it_restored(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = services.mailbox_row(conn)
    for _ in range(2):  # refused twice: the second refusal is no transition
        run_id = _run(conn, mailbox_id)
        failed = SyncFailed(run_id=run_id, mailbox_id=mailbox_id, lease_token=1,
                            error_kind=ErrorKind.AUTH, error="[AUTHENTICATIONFAILED] no",
                            finished_at=NOW)
        handle(failed, deps)
        handle(failed, deps)
    _apply(_sync(mailbox_id, _run(conn, mailbox_id), 1, [_message(1)], last_uid=1), deps)

    told = [(c["type"], c.get("error_kind")) for c in _changes(conn, mailbox_id)]
    assert [t for t in told if t[0] != "FolderCreated" and t[0] != "MessageStored"] == [
        ("MailboxSyncFailed", "auth"), ("CredentialsInvalid", None),
        ("MailboxSyncFailed", "auth"), ("CredentialsRestored", None)]


def test_the_relay_publishes_in_order_with_stable_ids_and_marks_rows_after_the_confirm(
    conn: db.Connection, deps: PersisterDeps, settings: Any,
) -> None:
    mailbox_id = services.mailbox_row(conn)
    _apply(_sync(mailbox_id, _run(conn, mailbox_id), 1, [_message(1), _message(2)],
                 last_uid=2), deps)
    written = _changes(conn, mailbox_id)
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    with Connection(settings.broker_url) as amqp:
        queue = Queue("test.changes", exchange=topology.CHANGES,
                      routing_key=topology.changes_binding(mailbox_id), durable=False)
        queue(amqp.default_channel).declare()
        assert publish_pending(conn, publisher) == len(written)
        assert publish_pending(conn, publisher) == 0  # marked published
        conn.execute("UPDATE change_outbox SET published_at = NULL")  # as if killed before marking
        publish_pending(conn, publisher)
        got = []
        while (message := queue(amqp.default_channel).get(no_ack=True)) is not None:
            got.append((message.delivery_info["routing_key"], message.properties["type"],
                        decode_change(message.body)))
    publisher.close()

    assert [g[2].model_dump(mode="json") for g in got] == written * 2  # at least once, same ids
    assert got[0][0] == f"mailbox.{mailbox_id}.folder_created"
    assert got[2][:2] == (f"mailbox.{mailbox_id}.message_stored", "MessageStored")
    assert outbox.prune(conn, 3600) == 0  # young rows stay
    conn.execute("UPDATE change_outbox SET created_at = now() - interval '2 hours'")
    assert outbox.prune(conn, 3600) == len(written)


def test_a_new_uidvalidity_announces_the_old_uids_expunged_and_the_mail_again_as_known_backfill(
    conn: db.Connection, deps: PersisterDeps,
) -> None:
    mailbox_id = services.mailbox_row(conn)
    _apply(_sync(mailbox_id, _run(conn, mailbox_id), 1, [_message(1)], last_uid=1), deps)
    before = len(_changes(conn, mailbox_id))
    reset = _sync(mailbox_id, _run(conn, mailbox_id), 2, [_message(1)], last_uid=1)
    for event in reset:  # the same folder under UIDVALIDITY 8
        if hasattr(event, "uidvalidity"):
            event = event.model_copy(update={"uidvalidity": 8})
        handle(event, deps)

    news = [(c["type"], c["uidvalidity"], c.get("backfill"), c.get("known"))
            for c in _changes(conn, mailbox_id)[before:]]
    assert news == [("MessageStored", 8, True, True), ("MessageExpunged", 7, None, None)]
