"""The persister against a real PostgreSQL: duplicated and reordered events converge, stale
attempts are fenced off, and checkpoints never run ahead of the data."""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailferry import db, outbox, repository
from mailferry.devkit import services
from mailferry.errors import Postponed
from mailferry.messages import (
    FetchedMessage,
    FetcherEvent,
    FlagChange,
    FlagsChanged,
    FolderInfo,
    FoldersListed,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
    SyncCompleted,
    SyncFinished,
    SyncStarted,
)
from mailferry.services.persister.handlers import PersisterDeps, handle

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def _stored_stream(conn: db.Connection, deps: PersisterDeps) -> int:
    """A mailbox whose whole example sync (:func:`_stream`) was stored in order."""
    mailbox_id = services.mailbox_row(conn)
    for event in _stream(mailbox_id, _run(conn, mailbox_id)):
        handle(event, deps)
    return mailbox_id


def _run(conn: db.Connection, mailbox_id: int, listed: bool = False) -> uuid.UUID:
    """A queued run; ``listed``: its listing counts as stored (its mail waits for none)."""
    run_id = uuid.uuid4()
    conn.execute("INSERT INTO sync_runs (id, mailbox_id, status, requested_by, folders_listed) "
                 "VALUES (%s, %s, 'queued', 'test', %s)", (run_id, mailbox_id, listed))
    return run_id


def _message(uid: int, body: bytes, flags: tuple[str, ...] = ()) -> FetchedMessage:
    raw = b"Subject: message " + str(uid).encode() + b"\r\n\r\n" + body
    return FetchedMessage(uid=uid, flags=flags, internal_date=NOW, size=len(raw), raw=raw)


def _stream(mailbox_id: int, run_id: uuid.UUID, token: int = 1) -> list[FetcherEvent]:
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": token}
    inbox = FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox")
    sent = FolderInfo(name="Sent", raw_name="Sent", delimiter="/", flags=("\\Sent",), type="sent")
    return [
        SyncStarted(**common, fetcher="test", started_at=NOW),
        FoldersListed(**common, folders=(inbox, sent), first_listing=True),
        MessagesFetched(**common, folder="INBOX", uidvalidity=7, batch_no=0,
                        messages=(_message(1, b"a", ("\\Seen",)), _message(2, b"b"))),
        MessagesFetched(**common, folder="INBOX", uidvalidity=7, batch_no=1,
                        messages=(_message(5, b"c"),)),
        # the same bytes in another folder: one raw copy, two placements
        MessagesFetched(**common, folder="Sent", uidvalidity=9, batch_no=0,
                        messages=(_message(1, b"a"),)),
        FolderSynced(**common, folder="INBOX", uidvalidity=7, uidnext=6, last_uid=5, batches=2,
                     messages=3),
        FolderSynced(**common, folder="Sent", uidvalidity=9, uidnext=2, last_uid=1, batches=1,
                     messages=1),
        SyncFinished(**common, folders=2, finished_at=NOW),
    ]


def _state(conn: db.Connection) -> dict[str, Any]:
    """Everything the events determine, independent of ids and timestamps."""
    return {
        "folders": conn.execute(
            """SELECT name, type, sync_enabled, uidvalidity, last_uid FROM folders
                ORDER BY name""").fetchall(),
        "placements": conn.execute(
            """SELECT f.name, mf.uidvalidity, mf.uid, mf.flags, mf.seen,
                      mf.expunged_at IS NOT NULL AS expunged, encode(g.sha256, 'hex') AS sha256
                 FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
                 LEFT JOIN messages g ON g.id = mf.message_id ORDER BY 1, 2, 3""").fetchall(),
        "raw": conn.execute("SELECT count(*) AS n FROM raw_messages").fetchone(),
        "runs": conn.execute("SELECT status, messages_stored FROM sync_runs").fetchall(),
    }


@pytest.fixture
def deps(database_url: str) -> PersisterDeps:
    return PersisterDeps(connection=db.Reconnecting(database_url))


def test_a_sync_in_order_stores_messages_and_moves_checkpoints(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    _stored_stream(conn, deps)
    state = _state(conn)
    assert state["folders"] == [
        {"name": "INBOX", "type": "inbox", "sync_enabled": True, "uidvalidity": 7, "last_uid": 5},
        {"name": "Sent", "type": "sent", "sync_enabled": True, "uidvalidity": 9, "last_uid": 1},
    ]
    assert [(p["name"], p["uid"], p["seen"]) for p in state["placements"] if not p["expunged"]] == [
        ("INBOX", 1, True), ("INBOX", 2, False), ("INBOX", 5, False), ("Sent", 1, False)]
    assert state["raw"] == {"n": 3}
    assert state["runs"] == [{"status": "done", "messages_stored": 4}]


@pytest.mark.parametrize("seed", range(6))
def test_any_order_with_duplicates_converges_to_the_same_state(
    conn: db.Connection, deps: PersisterDeps, seed: int
) -> None:
    mailbox_id = services.mailbox_row(conn)
    run_id = _run(conn, mailbox_id)
    for event in _stream(mailbox_id, run_id):
        handle(event, deps)
    expected = _state(conn)

    conn.execute("DELETE FROM folders; DELETE FROM messages; DELETE FROM raw_messages; "
                 "DELETE FROM sync_runs; DELETE FROM sync_folders; DELETE FROM sync_batches")
    run_id = _run(conn, mailbox_id)
    events = _stream(mailbox_id, run_id) * 2
    random.Random(seed).shuffle(events)
    _deliver(events, deps)
    assert _state(conn) == expected


def _deliver(events: list[FetcherEvent], deps: PersisterDeps) -> int:
    """As the broker delivers them: an event that is postponed comes back after the others.
    Returns how many times events were postponed."""
    queue, postponed, in_a_row = list(events), 0, 0
    while queue:
        event = queue.pop(0)
        try:
            handle(event, deps)
        except Postponed:
            queue.append(event)
            postponed += 1
            in_a_row += 1
            assert in_a_row <= len(queue), f"postponed for ever: {queue}"
            continue
        in_a_row = 0
    return postponed


def test_mail_of_a_new_folder_waits_for_its_runs_listing_so_the_folder_is_announced_first(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = services.mailbox_row(conn)
    stream = _stream(mailbox_id, _run(conn, mailbox_id))
    # the first batches before the listing (another thread or persister took the listing)
    assert _deliver([stream[0], stream[2], stream[4], stream[1], *stream[3:4], *stream[5:]],
                    deps) == 2
    changes = [(c["type"], c.get("folder"), c.get("folder_type"))
               for c in outbox.since(conn, 0, mailbox_id)]
    assert changes[:2] == [("FolderCreated", "INBOX", "inbox"), ("FolderCreated", "Sent", "sent")]
    assert [t for t, _, _ in changes[2:]] == ["MessageStored"] * 4
    assert _state(conn)["runs"] == [{"status": "done", "messages_stored": 4}]


def test_a_batch_waits_in_its_thread_for_the_listing_another_thread_is_storing(
    conn: db.Connection, deps: PersisterDeps, database_url: str
) -> None:
    mailbox_id = services.mailbox_row(conn)
    stream = _stream(mailbox_id, _run(conn, mailbox_id))
    handle(stream[0], deps)
    errors: list[BaseException] = []

    def batch() -> None:
        try:
            handle(stream[2], PersisterDeps(connection=db.Reconnecting(database_url)))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
    thread = threading.Thread(target=batch)
    thread.start()
    time.sleep(0.05)
    handle(stream[1], deps)  # the listing, stored while the batch waits
    thread.join(10)
    assert errors == [], "the batch was postponed instead of waiting for the listing"
    assert [(p["name"], p["uid"]) for p in _state(conn)["placements"]] == [("INBOX", 1), ("INBOX", 2)]


def test_mail_of_a_run_that_is_no_longer_active_waits_for_no_listing(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = services.mailbox_row(conn)
    run_id = _run(conn, mailbox_id)
    stream = _stream(mailbox_id, run_id)
    handle(stream[0], deps)
    conn.execute("UPDATE sync_runs SET status = 'failed' WHERE id = %s", (run_id,))
    handle(stream[2], deps)  # its listing may never come: stored at once, as before
    placed = [(p["name"], p["uid"]) for p in _state(conn)["placements"]]
    assert placed == [("INBOX", 1), ("INBOX", 2)]


def test_a_checkpoint_waits_for_all_announced_batches(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = services.mailbox_row(conn)
    stream = _stream(mailbox_id, _run(conn, mailbox_id))
    missing_batch = stream.pop(3)  # INBOX batch 1
    for event in stream:
        handle(event, deps)
    inbox = conn.execute("SELECT last_uid FROM folders WHERE name = 'INBOX'").fetchone()
    assert inbox == {"last_uid": 0}
    assert conn.execute("SELECT status FROM sync_runs").fetchone() == {"status": "running"}
    handle(missing_batch, deps)
    assert conn.execute("SELECT last_uid FROM folders WHERE name = 'INBOX'").fetchone() == {
        "last_uid": 5}
    assert conn.execute("SELECT status FROM sync_runs").fetchone() == {"status": "done"}


def test_events_of_an_attempt_whose_lease_was_taken_over_are_refused(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = services.mailbox_row(conn, lease_token=2)
    stale = _stream(mailbox_id, _run(conn, mailbox_id), token=1)
    for event in stale:
        handle(event, deps)
    assert conn.execute("SELECT count(*) AS n FROM message_folders").fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM folders").fetchone() == {"n": 0}


def test_a_message_that_cannot_be_parsed_is_stored_with_its_exact_bytes(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = services.mailbox_row(conn)
    run_id = _run(conn, mailbox_id, listed=True)
    hostile = b"\x00\xff\xfeSubject: \x00bad\xc3(\r\n\r\n\x00body\xff"
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 1}
    handle(MessagesFetched(**common, folder="INBOX", uidvalidity=1, batch_no=0, messages=(
        FetchedMessage(uid=1, size=len(hostile), raw=hostile),)), deps)
    assert services.parse_stored(conn) == 1
    row = conn.execute("SELECT r.data, g.subject FROM messages g "
                       "JOIN raw_messages r USING (sha256)").fetchone()
    assert row is not None
    assert bytes(row["data"]) == hostile
    assert "\x00" not in (row["subject"] or "")


def test_big_messages_are_streamed_in_exactly_once_beside_small_ones_of_the_same_batch(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    from mailferry.services.persister.store import COPY_RAW_FROM

    mailbox_id = services.mailbox_row(conn)
    run_id = _run(conn, mailbox_id, listed=True)
    big = b"Subject: big\r\n\r\n" + bytes(range(256)) * (COPY_RAW_FROM // 256 + 1)
    small = b"Subject: small\r\n\r\nhi\r\n"
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 1}
    for folder in ("INBOX", "Archive"):  # the second time, the same bytes are known already
        handle(MessagesFetched(**common, folder=folder, uidvalidity=1, batch_no=0, messages=(
            FetchedMessage(uid=1, size=len(big), raw=big),
            FetchedMessage(uid=2, size=len(small), raw=small))), deps)
    assert services.parse_stored(conn) == 2  # the parse step, as a persister's thread runs it
    rows = conn.execute("SELECT r.size, r.data, g.subject FROM messages g "
                        "JOIN raw_messages r USING (sha256) ORDER BY r.size DESC").fetchall()
    assert [(r["size"], bytes(r["data"]), r["subject"]) for r in rows] == [
        (len(big), big, "big"), (len(small), small, "small")]
    assert conn.execute("SELECT count(*) AS n FROM message_folders").fetchone() == {"n": 4}


def test_folders_gone_from_the_server_are_deleted_unless_they_hold_synced_mail(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = _stored_stream(conn, deps)
    conn.execute("INSERT INTO folders (mailbox_id, name, raw_name) VALUES (%s, 'Empty', 'Empty')",
                 (mailbox_id,))
    run_id = _run(conn, mailbox_id)
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 1}
    handle(FoldersListed(**common, folders=(
        FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox"),)), deps)
    folders = conn.execute("SELECT name, gone_at IS NOT NULL AS gone FROM folders ORDER BY name")
    assert folders.fetchall() == [{"name": "INBOX", "gone": False}, {"name": "Sent", "gone": True}]


def test_every_permutation_of_a_small_stream_converges(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    """Exhaustive for the events that race most: the last batch, its FolderSynced, SyncFinished."""
    mailbox_id = services.mailbox_row(conn)
    results = []
    for order in itertools.permutations(range(3)):
        conn.execute("DELETE FROM folders; DELETE FROM messages; DELETE FROM raw_messages; "
                     "DELETE FROM sync_runs; DELETE FROM sync_folders; DELETE FROM sync_batches")
        stream = _stream(mailbox_id, _run(conn, mailbox_id))
        racing = [stream[3], stream[5], stream[7]]  # INBOX batch 1, its FolderSynced, SyncFinished
        for event in (stream[0], stream[1], stream[2], stream[4], stream[6]):
            handle(event, deps)
        for i in order:
            handle(racing[i], deps)
        results.append(_state(conn))
    assert all(r == results[0] for r in results)
    assert results[0]["runs"] == [{"status": "done", "messages_stored": 4}]


def test_an_empty_folder_takes_its_checkpoint_whichever_of_its_runs_events_comes_first(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    """An empty folder's FolderSynced announces no batch, so it can be stored before the run's
    listing has made the folder's row (two persister threads, two persisters): the checkpoint
    then waits for the listing instead of being lost (a lost UIDVALIDITY hid a later rename)."""
    mailbox_id = services.mailbox_row(conn)
    inbox = FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox")
    drafts = FolderInfo(name="Drafts", raw_name="Drafts", delimiter="/", type="drafts")
    results = []
    for order in itertools.permutations(range(3)):
        _reset(conn)
        common: dict[str, Any] = {"run_id": _run(conn, mailbox_id), "mailbox_id": mailbox_id,
                                  "lease_token": 1}
        racing = [
            FoldersListed(**common, folders=(inbox, drafts), first_listing=True),
            FolderSynced(**common, folder="Drafts", uidvalidity=4, uidnext=1, last_uid=0,
                         batches=0, messages=0),
            SyncFinished(**common, folders=1, finished_at=NOW),
        ]
        handle(SyncStarted(**common, fetcher="test", started_at=NOW), deps)
        for i in order:
            handle(racing[i], deps)
        results.append(_state(conn))
    assert all(r == results[0] for r in results), results
    drafts_row = next(f for f in results[0]["folders"] if f["name"] == "Drafts")
    assert (drafts_row["uidvalidity"], drafts_row["last_uid"]) == (4, 0)
    assert results[0]["runs"] == [{"status": "done", "messages_stored": 0}]


def _reset(conn: db.Connection) -> None:
    conn.execute("TRUNCATE folders, messages, raw_messages, message_folders, sync_runs, "
                 "sync_folders, sync_batches CASCADE")


def _second_run(mailbox_id: int, run_id: uuid.UUID) -> list[FetcherEvent]:
    """What a later sync sends: flag changes, an expunge, a move in, new mail, the closing."""
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 2}
    return [
        SyncStarted(**common, fetcher="test", started_at=NOW),
        FoldersListed(**common, folders=(
            FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox"),
            FolderInfo(name="Sent", raw_name="Sent", delimiter="/", type="sent"))),
        FlagsChanged(**common, folder="INBOX", uidvalidity=7, batch_no=0, changes=(
            FlagChange(uid=1, flags=(), modseq=20), FlagChange(uid=2, flags=("\\Flagged",),
                                                             modseq=21))),
        MessagesExpunged(**common, folder="INBOX", uidvalidity=7, batch_no=1, uids=(5,)),
        MessagesFetched(**common, folder="INBOX", uidvalidity=7, batch_no=2,
                        messages=(_message(6, b"d", ("\\Seen",)),)),
        MessagesFetched(**common, folder="Sent", uidvalidity=9, batch_no=0,
                        messages=(_message(2, b"c"),)),  # moved: same bytes as INBOX uid 5
        FolderSynced(**common, folder="INBOX", uidvalidity=7, uidnext=7, last_uid=6, batches=3,
                     messages=1),
        FolderSynced(**common, folder="Sent", uidvalidity=9, uidnext=3, last_uid=2, batches=1,
                     messages=1),
        SyncFinished(**common, folders=2, finished_at=NOW),
    ]


def _two_runs(conn: db.Connection, deps: PersisterDeps, second_order: list[int]) -> dict[str, Any]:
    _reset(conn)
    conn.execute("UPDATE mailboxes SET lease_token = 1")
    mailbox_id = int(conn.execute("SELECT id FROM mailboxes").fetchone()["id"])  # type: ignore[index]
    for event in _stream(mailbox_id, _run(conn, mailbox_id)):
        handle(event, deps)
    conn.execute("UPDATE mailboxes SET lease_token = 2")
    second = _second_run(mailbox_id, _run(conn, mailbox_id))
    for i in second_order:
        handle(second[i], deps)
    return _state(conn)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_permutation_and_duplication_of_a_sync_converges_to_the_same_state(
    conn: db.Connection, deps: PersisterDeps, data: st.DataObject
) -> None:
    if conn.execute("SELECT count(*) AS n FROM mailboxes").fetchone() == {"n": 0}:
        services.mailbox_row(conn)
    expected = _two_runs(conn, deps, list(range(9)))
    order = data.draw(st.permutations(range(9)))
    duplicates = data.draw(st.lists(st.integers(0, 8), max_size=6))
    shuffled = data.draw(st.permutations([*order, *duplicates]))
    assert _two_runs(conn, deps, list(shuffled)) == expected
    assert expected["runs"] == [{"status": "done", "messages_stored": 4},
                                {"status": "done", "messages_stored": 2}]
    placed = {(p["name"], p["uid"]): (p["flags"], p["expunged"]) for p in expected["placements"]}
    assert placed[("INBOX", 1)] == ([], False)
    assert placed[("INBOX", 2)] == (["\\Flagged"], False)
    assert placed[("INBOX", 5)][1] is True  # a tombstone
    assert placed[("Sent", 2)] == ([], False)


def test_a_late_insert_cannot_resurrect_an_expunged_uid(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = services.mailbox_row(conn)
    run_id = _run(conn, mailbox_id, listed=True)
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 1}
    handle(MessagesExpunged(**common, folder="INBOX", uidvalidity=7, batch_no=1, uids=(5,)), deps)
    handle(MessagesFetched(**common, folder="INBOX", uidvalidity=7, batch_no=0,
                           messages=(_message(5, b"late"),)), deps)
    row = conn.execute("SELECT expunged_at IS NOT NULL AS gone FROM message_folders").fetchone()
    assert row == {"gone": True}


def test_older_flags_never_overwrite_newer_ones(conn: db.Connection, deps: PersisterDeps) -> None:
    mailbox_id = services.mailbox_row(conn, lease_token=3)
    for event in _stream(mailbox_id, _run(conn, mailbox_id), token=3):
        handle(event, deps)
    run_id = _run(conn, mailbox_id)
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 3}
    handle(FlagsChanged(**common, folder="INBOX", uidvalidity=7, batch_no=0,
                        changes=(FlagChange(uid=2, flags=("\\Answered",)),)), deps)
    conn.execute("UPDATE message_folders SET flags_token = 4 WHERE uid = 2")  # newer attempt's
    handle(FlagsChanged(**common, folder="INBOX", uidvalidity=7, batch_no=1,
                        changes=(FlagChange(uid=2, flags=()),)), deps)
    row = conn.execute("SELECT mf.flags FROM message_folders mf JOIN folders f ON f.id = mf.folder_id "
                       "WHERE f.name = 'INBOX' AND uid = 2").fetchone()
    assert row == {"flags": ["\\Answered"]}


def test_the_last_batch_and_its_folder_synced_stored_at_the_same_moment_still_close_the_folder(
    conn: db.Connection, deps: PersisterDeps, database_url: str
) -> None:
    """Two persisters each apply one of the two last pieces of INBOX while a third transaction
    holds the run; whichever commits second must see the first and close the folder and run."""
    mailbox_id = services.mailbox_row(conn)
    run_id = _run(conn, mailbox_id)
    stream = _stream(mailbox_id, run_id)
    last_batch, inbox_synced = stream[3], stream[5]
    for event in stream:
        if event not in (last_batch, inbox_synced):
            handle(event, deps)
    with db.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM sync_runs WHERE id = %s FOR UPDATE", (run_id,))
        workers = [threading.Thread(target=handle, args=(event, PersisterDeps(
            connection=db.Reconnecting(database_url)))) for event in (last_batch, inbox_synced)]
        for worker in workers:
            worker.start()
        assert services.eventually(lambda: conn.execute(
            """SELECT count(*) AS n FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'""",
        ).fetchone() == {"n": 2}), "both persisters wait on the run"
        holder.rollback()
    for worker in workers:
        worker.join(timeout=30)
    assert conn.execute("SELECT last_uid FROM folders WHERE name = 'INBOX'").fetchone() == {
        "last_uid": 5}
    assert conn.execute("SELECT status FROM sync_runs").fetchone() == {"status": "done"}


def _no_op_run(mailbox_id: int, run_id: uuid.UUID, token: int = 1) -> list[FetcherEvent]:
    """A second sync that found nothing new: the folders' checkpoints again, a new folder
    listed (not enabled: a change-stream row, no mail), no batch."""
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": token}
    return [
        SyncStarted(**common, fetcher="test", started_at=NOW),
        FoldersListed(**common, folders=(
            FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox"),
            FolderInfo(name="Sent", raw_name="Sent", delimiter="/", flags=("\\Sent",),
                       type="sent"),
            FolderInfo(name="Archive", raw_name="Archive", delimiter="/", type="archive"))),
        FolderSynced(**common, folder="INBOX", uidvalidity=7, uidnext=6, highest_modseq=40,
                     last_uid=5, batches=0, messages=0),
        FolderSynced(**common, folder="Sent", uidvalidity=9, uidnext=2, last_uid=1, batches=0,
                     messages=0),
        SyncFinished(**common, folders=2, finished_at=NOW),
    ]


def _one_event(events: list[FetcherEvent]) -> SyncCompleted:
    completed = SyncCompleted.of(events[:-1], events[-1])  # type: ignore[arg-type]
    assert completed is not None
    return completed


def _mailbox_state(conn: db.Connection, mailbox_id: int) -> dict[str, Any]:
    """What a run leaves on one mailbox: its folders and checkpoints, its runs, its last sync
    and its change stream (without ids and times)."""
    return {
        "folders": conn.execute(
            """SELECT name, type, sync_enabled, uidvalidity, last_uid, uidnext, highest_modseq,
                      last_synced_at IS NOT NULL AS synced, last_error, gone_at IS NOT NULL AS gone
                 FROM folders WHERE mailbox_id = %s ORDER BY name""", (mailbox_id,)).fetchall(),
        "runs": conn.execute(
            """SELECT status, kind, started_at IS NOT NULL AS started, finished_at IS NOT NULL
                      AS finished, folders_listed, folders_expected, lease_token,
                      messages_stored, error_kind, error
                 FROM sync_runs WHERE mailbox_id = %s ORDER BY requested_at""",
            (mailbox_id,)).fetchall(),
        "mailbox": conn.execute(
            """SELECT last_sync_at IS NOT NULL AS synced, last_sync_status, last_error,
                      folder_report, change_seq FROM mailboxes WHERE id = %s""",
            (mailbox_id,)).fetchone(),
        "changes": conn.execute(
            """SELECT seq, type, payload - '{id,occurred_at,mailbox_id,folder_id,message_ref}'::text[]
                      AS payload
                 FROM change_outbox WHERE mailbox_id = %s ORDER BY seq""",
            (mailbox_id,)).fetchall(),
        "sync_folders": conn.execute(
            """SELECT s.folder, s.uidvalidity, s.batches, s.last_uid, s.uidnext, s.completed
                 FROM sync_folders s JOIN sync_runs r ON r.id = s.run_id
                WHERE r.mailbox_id = %s ORDER BY r.requested_at, s.folder""",
            (mailbox_id,)).fetchall(),
    }


def test_a_no_op_sync_as_one_event_leaves_the_store_as_its_separate_events_do(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    separate, together = _stored_stream(conn, deps), _stored_stream(conn, deps)
    for event in _no_op_run(separate, _run(conn, separate)):
        handle(event, deps)

    handle(_one_event(_no_op_run(together, _run(conn, together))), deps)

    state = _mailbox_state(conn, together)
    assert state == _mailbox_state(conn, separate)
    assert [r["status"] for r in state["runs"]] == ["done", "done"]
    assert state["folders"][0]["name"] == "Archive"  # listed, and announced
    assert [c["type"] for c in state["changes"]][-1] == "FolderCreated"
    assert {f["name"]: f["highest_modseq"] for f in state["folders"]}["INBOX"] == 40


def test_a_redelivered_no_op_sync_changes_nothing(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = _stored_stream(conn, deps)
    completed = _one_event(_no_op_run(mailbox_id, _run(conn, mailbox_id)))
    handle(completed, deps)
    once = _mailbox_state(conn, mailbox_id)

    handle(completed, deps)

    assert _mailbox_state(conn, mailbox_id) == once


def test_a_no_op_sync_of_an_attempt_whose_lease_was_taken_over_is_refused(
    conn: db.Connection, deps: PersisterDeps
) -> None:
    mailbox_id = _stored_stream(conn, deps)
    conn.execute("UPDATE mailboxes SET lease_token = 2 WHERE id = %s", (mailbox_id,))
    before = _mailbox_state(conn, mailbox_id)

    handle(_one_event(_no_op_run(mailbox_id, _run(conn, mailbox_id), token=1)), deps)

    after = _mailbox_state(conn, mailbox_id)
    assert after["runs"][-1]["status"] == "queued"
    assert {k: v for k, v in after.items() if k != "runs"} == {
        k: v for k, v in before.items() if k != "runs"}


def test_looking_messages_up_by_hash_reads_only_the_batch_however_big_the_mailbox(
        conn: db.Connection) -> None:
    """A mailbox in its first sync is new to the table's statistics: a lookup planned as a scan
    of the mailbox's messages made every batch dearer than the last (issue 11)."""
    mailbox_id = services.mailbox_row(conn)
    hashes = [hashlib.sha256(str(i).encode()).digest() for i in range(3000)]
    conn.execute("INSERT INTO raw_messages (sha256, size, data) "
                 "SELECT h, 1, 'x' FROM unnest(%s::bytea[]) AS h", (hashes,))
    conn.execute("INSERT INTO messages (mailbox_id, sha256, size) "
                 "SELECT %s, h, 1 FROM unnest(%s::bytea[]) AS h", (mailbox_id, hashes))
    batch = [*hashes[-100:], hashlib.sha256(b"not stored").digest()]
    with conn.transaction():
        found = repository.messages_by_hash(conn, mailbox_id, batch)
        read = conn.execute(
            """SELECT seq_tup_read + idx_tup_fetch AS n
                 FROM pg_stat_xact_user_tables WHERE relname = 'messages'""").fetchone()
    assert set(found) == set(hashes[-100:])
    assert read is not None and read["n"] <= 101


def test_reading_a_batchs_placements_before_and_after_its_write_reads_only_the_batch(
        conn: db.Connection) -> None:
    """The change stream's snapshots (outbox.messages_before, message_changes) of a batch in
    a folder new to the statistics probe the batch's UIDs, never the whole folder."""
    mailbox_id = services.mailbox_row(conn)
    row = conn.execute("INSERT INTO folders (mailbox_id, name, raw_name, sync_enabled) "
                       "VALUES (%s, 'INBOX', 'INBOX', true) RETURNING id", (mailbox_id,)).fetchone()
    assert row is not None
    conn.execute("INSERT INTO message_folders (folder_id, uidvalidity, uid) "
                 "SELECT %s, 1, generate_series(1, 3000)", (row["id"],))
    batch = [*range(2901, 3001), 3001]
    with conn.transaction():
        before = outbox.messages_before(conn, mailbox_id, row["id"], 1, batch)
        changes = outbox.message_changes(conn, mailbox_id, row["id"], 1, batch,
                                         outbox.MessagesBefore({}, set()), 1)
        read = conn.execute(
            """SELECT seq_tup_read + idx_tup_fetch AS n
                 FROM pg_stat_xact_user_tables WHERE relname = 'message_folders'""").fetchone()
    assert sorted(before.placements) == list(range(2901, 3001))
    assert len(changes) == 100
    assert read is not None and read["n"] <= 2 * 101
