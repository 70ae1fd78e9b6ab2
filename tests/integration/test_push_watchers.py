"""The scheduler's watches against real PostgreSQL and Dovecot: schedulers share them fairly, a
joining one gets its part, a stopped one's are taken over; push runs do not postpone the schedule.
Manager passes are driven by hand (``pass_once``) so the story is deterministic."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry import app, db, metrics, runs
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.messages import AnyMessage
from mailferry.services.scheduler.watchers import Watchers
from mailferry.sync_requests import due_mailboxes


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        yield dovecot


def _mailboxes(conn: db.Connection, settings: Settings, server: Dovecot, count: int) -> list[int]:
    box = PasswordBox(settings.secret_key)
    ids = []
    for i in range(count):
        server.add_user(f"u{i}", "pw")
        ids.append(app.add_mailbox(conn, box, owner_email=None, host=server.host,
                                   port=server.port, security="none", username=f"u{i}",
                                   password="pw"))
    return ids


def _watchers(settings: Settings, name: str, published: list[AnyMessage]) -> Watchers:
    return Watchers(settings, name, published.append, PasswordBox(settings.secret_key))


def _watched(watchers: Watchers) -> dict[str, float]:
    """What the scheduler's metrics say: mailferry_scheduler_watched_mailboxes by state."""
    [family] = metrics.WatchCollector(watchers.states).collect()
    return {sample.labels["state"]: sample.value for sample in family.samples}


def _holders(conn: db.Connection) -> dict[str, int]:
    rows = conn.execute("""SELECT holder, count(*) AS n FROM mailbox_watches
                            WHERE holder IS NOT NULL AND lease_expires_at > now()
                            GROUP BY holder""").fetchall()
    return {r["holder"]: r["n"] for r in rows}


def test_schedulers_share_the_watches_and_take_over_a_stopped_ones(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    settings = settings.model_copy(update={"push_lease": 2.0})
    _mailboxes(conn, settings, server, 4)
    published: list[AnyMessage] = []
    first, second = _watchers(settings, "s1", published), _watchers(settings, "s2", published)
    try:
        first.pass_once()
        assert _holders(conn) == {"s1": 4}, "alone, a scheduler watches every mailbox"
        assert services.eventually(
            lambda: all(w.state == "watching" for w in first.watches.values()), 20)
        assert _watched(first) == {"watching": 4, "polling": 0, "backoff": 0, "off": 0}

        second.pass_once()  # joins: its heartbeat halves the fair share...
        first.pass_once()  # ...so the first gives two back...
        second.pass_once()  # ...and the second claims them
        assert _holders(conn) == {"s1": 2, "s2": 2}
        assert _watched(first)["watching"] == 2

        for watch in second.watches.values():  # the second dies without a word
            watch.stop()
        second.watches.clear()
        time.sleep(settings.push_lease + 0.2)
        first.pass_once()
        assert _holders(conn) == {"s1": 4}, "its leases expired: the first takes them over"
        tokens = conn.execute("SELECT min(token) AS t FROM mailbox_watches").fetchone()
        assert tokens is not None and tokens["t"] >= 1
    finally:
        first.stop()
        second.stop()


def test_a_scheduler_never_holds_more_watches_than_its_cap(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    settings = settings.model_copy(update={"push_max_connections": 2})
    _mailboxes(conn, settings, server, 3)
    watchers = _watchers(settings, "s1", [])
    try:
        watchers.pass_once()
        assert _holders(conn) == {"s1": 2}
    finally:
        watchers.stop()


def test_an_oauth2_mailbox_is_left_to_the_schedule_and_never_marked_invalid_by_a_watch(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    password, oauth2 = _mailboxes(conn, settings, server, 2)
    conn.execute("UPDATE mailboxes SET auth_kind = 'oauth2' WHERE id = %s", (oauth2,))
    watchers = _watchers(settings, "s1", [])
    try:
        watchers.pass_once()
        watched = conn.execute("SELECT mailbox_id FROM mailbox_watches WHERE holder = 's1'"
                               ).fetchall()
        assert [r["mailbox_id"] for r in watched] == [password]
    finally:
        watchers.stop()
    assert conn.execute("SELECT credentials_invalid_at FROM mailboxes WHERE id = %s",
                        (oauth2,)).fetchone() == {"credentials_invalid_at": None}


def test_a_push_run_does_not_postpone_the_scheduled_sync(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    [mailbox_id] = _mailboxes(conn, settings, server, 1)
    run_id = runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False,
                          requested_by="push")
    assert run_id is not None
    runs.give_up(conn, run_id, mailbox_id, "done for this test")
    assert due_mailboxes(conn, 3600) == [mailbox_id]


def test_too_many_connections_is_a_backoff_never_invalid_credentials(
    conn: db.Connection, settings: Settings, tmp_path: Path,
) -> None:
    settings = settings.model_copy(update={"push_backoff_max": 0.5})
    with Dovecot(tmp_path / "limited", max_connections_per_user=1) as limited:
        [mailbox_id] = _mailboxes(conn, settings, limited, 1)
        watchers = _watchers(settings, "s1", [])
        occupant = limited.client("u0")  # the account's one connection is taken
        try:
            watchers.pass_once()
            watch = watchers.watches[mailbox_id]
            assert services.eventually(lambda: watch.state == "backoff" and watch.error, 20)
            assert "[LIMIT]" in str(watch.error) and watch.auth_error is None
            watchers.pass_once()
            row = conn.execute("SELECT credentials_invalid_at FROM mailboxes WHERE id = %s",
                               (mailbox_id,)).fetchone()
            assert row is not None and row["credentials_invalid_at"] is None
            occupant.logout()
            assert services.eventually(lambda: watch.state == "watching", 30), \
                "once a connection is free, the watch is up"
        finally:
            watchers.stop()
