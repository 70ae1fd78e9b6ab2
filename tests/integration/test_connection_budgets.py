"""The connection budgets on a real PostgreSQL: slots are claimed atomically up to an account's
budget (and a host's), freed by their release or by their lease's expiry, renewed while held;
a watch leaves the last slot to syncs; a fetcher that finds none free leaves its run queued."""

from __future__ import annotations

import threading
import time
from datetime import date

import pytest

from mailferry import app, db, runs, slots
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.errors import NoConnectionSlot
from mailferry.messages import AnyMessage, ContinueSync, SyncMailbox
from mailferry.services.fetcher.handlers import FetcherDeps, sync_mailbox

HOST = "imap.example.com"


def _claim(conn: db.Connection, settings: Settings, username: str = "alice",
           purpose: slots.Purpose = slots.Purpose.SYNC, host: str = HOST,
           seconds: float = 60.0) -> int | None:
    return slots.claim(conn, settings, holder="test", mailbox_id=1, host=host,
                       username=username, purpose=purpose, seconds=seconds)


def test_an_account_gets_as_many_slots_as_its_budget_and_a_released_one_is_free_again(
    conn: db.Connection, settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 2})
    first, second = _claim(conn, settings), _claim(conn, settings)
    assert first is not None and second is not None
    assert _claim(conn, settings) is None
    assert _claim(conn, settings, username="ALICE") is None, "user names are one account"
    assert _claim(conn, settings, host="IMAP.Example.com.") is None, "host names too"
    assert _claim(conn, settings, username="bob") is not None, "another account has its own"
    slots.release(conn, first)
    assert _claim(conn, settings) is not None


def test_the_slots_of_a_process_that_died_expire_within_a_lease(
    conn: db.Connection, settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 1})
    assert _claim(conn, settings, seconds=0.5) is not None  # never renewed, never released
    assert _claim(conn, settings) is None
    time.sleep(0.7)
    assert _claim(conn, settings) is not None
    assert slots.prune(conn) == 0, "the claim deleted the expired slot"


def test_a_watch_leaves_the_last_slot_of_each_budget_to_syncs(
    conn: db.Connection, settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 2})
    assert _claim(conn, settings, purpose=slots.Purpose.WATCH) is not None
    assert _claim(conn, settings, purpose=slots.Purpose.WATCH) is None
    assert _claim(conn, settings) is not None, "the sync gets the slot the watch left"
    assert _claim(conn, settings) is None
    single = settings.model_copy(update={"max_connections_per_account": 1})
    assert _claim(conn, single, username="bob", purpose=slots.Purpose.WATCH) is None, \
        "with a budget of one, an account is never watched"


def test_a_host_budget_counts_every_account_on_that_host(
    conn: db.Connection, settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_host": 2})
    assert _claim(conn, settings, username="alice") is not None
    assert _claim(conn, settings, username="bob") is not None
    assert _claim(conn, settings, username="carol") is None
    assert _claim(conn, settings, username="carol", host="imap.other.example") is not None


def test_claims_at_the_same_moment_never_exceed_the_budget(
    settings: Settings, database_url: str,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 3})
    barrier = threading.Barrier(12)
    won: list[int | None] = []

    def contender() -> None:
        with db.connect(database_url, autocommit=True) as own:
            barrier.wait()
            won.append(_claim(own, settings))

    threads = [threading.Thread(target=contender) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 12
    assert len([slot for slot in won if slot is not None]) == 3


def test_a_process_renews_the_slots_it_holds_and_its_release_frees_them(
    conn: db.Connection, settings: Settings,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 1})
    process = slots.ConnectionSlots(settings, "fetcher-1", seconds=1.5)
    try:
        with process.held(1, HOST, "alice", slots.Purpose.SYNC) as slot:
            time.sleep(2.5)  # longer than its lease: renewed meanwhile
            assert _claim(conn, settings) is None
            with pytest.raises(NoConnectionSlot, match="allows 1"), \
                    process.held(2, HOST, "alice", slots.Purpose.SYNC):
                pass
        assert conn.execute("SELECT 1 FROM imap_connection_slots WHERE id = %s",
                            (slot,)).fetchone() is None
        assert process.in_use == 0
    finally:
        process.close()


def test_a_sync_that_finds_no_slot_free_leaves_its_run_queued_and_comes_back_later(
    conn: db.Connection, settings: Settings, database_url: str,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 1})
    mailbox_id = services.mailbox_row(conn)
    mailbox = conn.execute("SELECT host, username FROM mailboxes WHERE id = %s",
                           (mailbox_id,)).fetchone()
    assert mailbox is not None
    assert _claim(conn, settings, username=mailbox["username"], host=mailbox["host"])
    run_id = runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False,
                          requested_by="test")
    assert run_id is not None
    published: list[AnyMessage] = []
    deps = FetcherDeps(settings=settings, connection=db.Reconnecting(database_url),
                       publish=published.append, passwords=PasswordBox(settings.secret_key),
                       fetcher_id="fetcher-1")
    try:
        with pytest.raises(NoConnectionSlot) as waited:
            sync_mailbox(SyncMailbox(run_id=run_id, mailbox_id=mailbox_id), deps)
    finally:
        assert deps.slots is not None
        deps.slots.close()
    assert waited.value.retry_after is not None and waited.value.retry_after > 0
    assert published == [], "nothing started: no SyncStarted, no SyncFailed"
    run = conn.execute("SELECT status, error_kind, error FROM sync_runs WHERE id = %s",
                       (run_id,)).fetchone()
    assert run is not None and run["status"] == "queued" and run["error_kind"] == "throttled"
    assert "no connection slot free" in run["error"]
    row = conn.execute("""SELECT throttled_until > now() AS waiting, lease_owner,
                                 credentials_invalid_at FROM mailboxes WHERE id = %s""",
                       (mailbox_id,)).fetchone()
    assert row == {"waiting": True, "lease_owner": None, "credentials_invalid_at": None}
    [listed] = app.list_mailboxes(conn)
    assert listed["throttled_until"] is not None
    assert listed["waiting"].startswith("no connection slot free for 'u' on h")


def test_a_slice_that_finds_no_slot_free_keeps_its_lease_handed_over_for_when_it_comes_back(
    conn: db.Connection, settings: Settings, database_url: str,
) -> None:
    settings = settings.model_copy(update={"max_connections_per_account": 1})
    mailbox_id = services.mailbox_row(conn, lease_token=7)
    conn.execute("""UPDATE mailboxes SET lease_owner = NULL,
                           lease_expires_at = now() + interval '1 minute' WHERE id = %s""",
                 (mailbox_id,))  # as the slice before handed it over
    assert _claim(conn, settings, username="u", host="h")
    run_id = runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False,
                          requested_by="test")
    assert run_id is not None
    deps = FetcherDeps(settings=settings, connection=db.Reconnecting(database_url),
                       publish=lambda _: None, passwords=PasswordBox(settings.secret_key),
                       fetcher_id="fetcher-1")
    command = ContinueSync(run_id=run_id, mailbox_id=mailbox_id, lease_token=7, slice=2,
                           since=date(2026, 1, 1), folders=(), folders_done=3)
    try:
        with pytest.raises(NoConnectionSlot):
            sync_mailbox(command, deps)
    finally:
        assert deps.slots is not None
        deps.slots.close()
    lease = conn.execute("""SELECT lease_token, lease_owner, lease_expires_at > now() AS live
                              FROM mailboxes WHERE id = %s""", (mailbox_id,)).fetchone()
    assert lease == {"lease_token": 7, "lease_owner": None, "live": True}, \
        "no new attempt can fence off the events the earlier slices published"
