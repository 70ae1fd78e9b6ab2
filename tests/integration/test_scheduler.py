"""The scheduler against real PostgreSQL and RabbitMQ: one command per due mailbox, never two."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from mailferry import db, messages, topology
from mailferry.broker import Publisher, connect
from mailferry.config import Settings
from mailferry.errors import BrokerUnavailable
from mailferry.services.scheduler.handlers import tick
from mailferry.sync_requests import request_syncs


@pytest.fixture
def publisher(settings: Settings) -> Iterator[Publisher]:
    p = Publisher(settings.broker_url, settings.retry_delays)
    yield p
    p.close()


def _mailboxes(conn: db.Connection, *, enabled: int = 0, disabled: int = 0,
               invalid: int = 0) -> list[int]:
    ids = []
    for kind, n in (("enabled", enabled), ("disabled", disabled), ("invalid", invalid)):
        for _ in range(n):
            row = conn.execute(
                """INSERT INTO mailboxes (name, host, port, security, username, password_encrypted,
                                          sync_enabled, credentials_invalid_at)
                   VALUES (%s, 'h', 993, 'ssl', 'u', '\\x00', %s,
                           CASE WHEN %s THEN now() END) RETURNING id""",
                (kind, kind != "disabled", kind == "invalid"),
            ).fetchone()
            assert row is not None
            ids.append(int(row["id"]))
    return ids


def _queued_commands(settings: Settings) -> list[messages.SyncMailbox]:
    out = []
    with connect(settings.broker_url) as conn:
        queue = topology.FETCHER.queue()(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            decoded = messages.decode(message.body)
            assert isinstance(decoded, messages.SyncMailbox)
            out.append(decoded)
    return out


def test_a_tick_queues_one_command_per_enabled_mailbox_with_working_credentials(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    enabled = _mailboxes(conn, enabled=3, disabled=1, invalid=1)[:3]
    assert tick(conn, publisher.publish, settings) == 3
    commands = _queued_commands(settings)
    assert sorted(c.mailbox_id for c in commands) == enabled
    runs = conn.execute("SELECT id, mailbox_id FROM sync_runs WHERE status = 'queued'").fetchall()
    assert {(r["id"], r["mailbox_id"]) for r in runs} == {(c.run_id, c.mailbox_id) for c in commands}


def test_a_mailbox_already_queued_is_not_queued_again(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    _mailboxes(conn, enabled=2)
    tick(conn, publisher.publish, settings)
    assert tick(conn, publisher.publish, settings) == 0
    assert len(_queued_commands(settings)) == 2


def test_a_mailbox_synced_within_the_interval_is_not_due(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    [mailbox_id] = _mailboxes(conn, enabled=1)
    tick(conn, publisher.publish, settings)
    conn.execute("UPDATE sync_runs SET status = 'done'")
    assert tick(conn, publisher.publish, settings) == 0
    conn.execute("UPDATE sync_runs SET requested_at = now() - interval '31 minutes'")
    assert tick(conn, publisher.publish, settings) == 1
    assert [c.mailbox_id for c in _queued_commands(settings)] == [mailbox_id, mailbox_id]


def test_two_schedulers_ticking_at_once_queue_each_mailbox_once(
    database_url: str, conn: db.Connection, settings: Settings
) -> None:
    ids = _mailboxes(conn, enabled=40)
    barrier = threading.Barrier(2)
    counts: list[int] = []

    def scheduler() -> None:
        own = db.connect(database_url, autocommit=True)
        pub = Publisher(settings.broker_url, settings.retry_delays)
        barrier.wait()
        counts.append(tick(own, pub.publish, settings))
        pub.close()
        own.close()

    threads = [threading.Thread(target=scheduler) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == len(ids)
    assert sorted(c.mailbox_id for c in _queued_commands(settings)) == ids


def test_a_run_that_never_finished_is_expired_and_the_mailbox_queued_again(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    _mailboxes(conn, enabled=1)
    tick(conn, publisher.publish, settings)
    conn.execute("UPDATE sync_runs SET requested_at = now() - interval '7 hours'")
    assert tick(conn, publisher.publish, settings) == 1
    statuses = conn.execute("SELECT status FROM sync_runs ORDER BY requested_at").fetchall()
    assert [r["status"] for r in statuses] == ["expired", "queued"]


def test_a_throttled_mailbox_waits_for_its_back_off_then_is_due_within_the_interval(
    conn: db.Connection, settings: Settings,
) -> None:
    from mailferry import runs
    from mailferry.sync_requests import due_mailboxes

    [mailbox] = _mailboxes(conn, enabled=1)
    run = runs.request(conn, mailbox, kind=runs.RunKind.MAILBOX, force=False,
                       requested_by="scheduler")
    assert run is not None
    until = runs.throttled(conn, run, mailbox, "NO [THROTTLED] slow down", base=300, cap=3600)
    backed_off = conn.execute("SELECT extract(epoch FROM %s - now()) AS s", (until,)).fetchone()
    assert backed_off is not None and 150 - 1 <= backed_off["s"] <= 300  # jitter: half to all
    assert due_mailboxes(conn, 0.001) == []  # not before throttled_until, whatever the interval
    # five minutes later: the back-off has passed, the interval (an hour) has not
    conn.execute("UPDATE sync_runs SET requested_at = requested_at - interval '5 minutes'")
    conn.execute("UPDATE mailboxes SET throttled_until = throttled_until - interval '5 minutes'")
    assert due_mailboxes(conn, 3600) == [mailbox]  # its sync did not happen: due at once
    row = conn.execute("""SELECT r.status, r.error_kind, m.credentials_invalid_at,
                                 m.throttle_count
                            FROM sync_runs r JOIN mailboxes m ON m.id = r.mailbox_id""").fetchone()
    assert row == {"status": "failed", "error_kind": "throttled", "credentials_invalid_at": None,
                   "throttle_count": 1}
    second = runs.request(conn, mailbox, kind=runs.RunKind.MAILBOX, force=False,
                          requested_by="scheduler")
    assert second is not None
    again = runs.throttled(conn, second, mailbox, "NO [THROTTLED]", base=300, cap=3600)
    doubled = conn.execute("SELECT extract(epoch FROM %s - now()) AS s", (again,)).fetchone()
    assert doubled is not None and 300 - 1 <= doubled["s"] <= 600  # the second in a row: doubled


def test_when_the_broker_fails_mid_tick_the_unpublished_mailboxes_are_due_again_at_once(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    ids = _mailboxes(conn, enabled=4)
    calls: list[int] = []

    def failing_second(message: messages.AnyMessage) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise BrokerUnavailable("publish to RabbitMQ failed: injected")
        publisher.publish(message)

    with pytest.raises(BrokerUnavailable):
        request_syncs(conn, failing_second, ids, requested_by="scheduler")
    runs = conn.execute("SELECT mailbox_id, status FROM sync_runs ORDER BY mailbox_id").fetchall()
    assert [(r["mailbox_id"], r["status"]) for r in runs] == [(ids[0], "queued"), (ids[1], "failed")]
    assert tick(conn, publisher.publish, settings) == 2  # the two never published
    assert sorted(c.mailbox_id for c in _queued_commands(settings)) == [ids[0], ids[2], ids[3]]


def test_a_tick_publishes_the_due_commands_in_batches_with_one_wait_for_their_confirms(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    ids = _mailboxes(conn, enabled=5)
    batches: list[int] = []

    def publish_many(batch: Sequence[messages.AnyMessage]) -> None:
        batches.append(len(batch))
        publisher.publish_many(batch)

    assert tick(conn, publisher.publish, settings, publish_many) == 5
    assert batches == [5]
    assert sorted(c.mailbox_id for c in _queued_commands(settings)) == ids


def test_when_a_batch_publish_fails_its_runs_are_withdrawn_and_due_again_at_the_next_tick(
    conn: db.Connection, settings: Settings, publisher: Publisher
) -> None:
    ids = _mailboxes(conn, enabled=4)
    arrived: list[int] = []

    def failing(batch: Sequence[messages.AnyMessage]) -> None:
        publisher.publish(batch[0])  # RabbitMQ took some of it before the failure
        arrived.append(batch[0].mailbox_id)  # type: ignore[union-attr]
        raise BrokerUnavailable("batch publish to RabbitMQ failed: injected")

    with pytest.raises(BrokerUnavailable):
        tick(conn, publisher.publish, settings, failing)
    assert conn.execute("SELECT count(*) AS n FROM sync_runs").fetchone() == {"n": 0}
    assert tick(conn, publisher.publish, settings, publisher.publish_many) == 4
    # the command that did arrive names a withdrawn run: the fetcher registers it again, or
    # skips it when the mailbox has another run (services/fetcher/handlers.py)
    assert sorted(c.mailbox_id for c in _queued_commands(settings)) == sorted([*arrived, *ids])
