"""Benchmark: one scheduler tick with 100,000 mailboxes in the table (issue 11).

Why this exists: the scheduler ticks every MAILFERRY_SCHEDULER_TICK seconds (60 by default) and
must find the due mailboxes among all of them. Its cost must follow the number of due mailboxes,
not the size of the table: the target is a tick of at most 1 s with 100,000 mailboxes, its
queries answered by indexes.

What it does: a private database (migrated) and RabbitMQ vhost; N mailbox rows inserted in one
statement (no Dovecot: rows only; 4% disabled, 1% with invalid credentials) and H finished runs
per mailbox (the history a deployment keeps; the newest within the sync interval, so nothing is
due). Then, each timed with the scheduler's own ``tick`` (a real confirmed publish per due
mailbox, into the private vhost):

1. **few due**: F mailboxes' runs moved back past the interval;
2. **none due**: the next tick, the steady state of a scheduler;
3. **many due**: M mailboxes due at once (a restart after a long outage, a first deployment).

Each tick is split into its steps (expire stale runs, find the due mailboxes, request their
syncs, published by the scheduler's PublisherPool), and ``EXPLAIN (ANALYZE, BUFFERS)`` of the
due query and the expiry shows which indexes answer them. This is a report, not a test: it
exits with 1 only when a tick queues the wrong number of mailboxes. Run it with
``.venv/bin/python bench/scheduler_tick.py`` (a few minutes, most of it filling the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mailferry import db, sync_requests
from mailferry.app.publishing import PARALLEL_PUBLISHES, PublisherPool
from mailferry.config import Settings
from mailferry.devkit import services
from mailferry.devkit.measure import machine
from mailferry.services.scheduler import handlers

_STEPS = ("expire_stale_runs", "due_mailboxes", "request_syncs")


def populate(conn: db.Connection, mailboxes: int, history: int, interval: float) -> float:
    """N mailboxes and H done runs each, the newest inside the interval; returns seconds."""
    started = time.perf_counter()
    conn.execute(
        """INSERT INTO mailboxes (name, host, port, security, username, password_encrypted,
                                  sync_enabled, credentials_invalid_at)
           SELECT 'm' || i, 'imap.example.com', 993, 'ssl', 'u' || i, '\\x00',
                  i %% 25 <> 0, CASE WHEN i %% 100 = 1 THEN now() END
             FROM generate_series(1, %s) AS i""", (mailboxes,))
    # The history in bulk, its trigger off (300,000 per-row updates would take minutes), then
    # the mailboxes' copy of their latest request set at once, as the trigger would have.
    conn.execute("ALTER TABLE sync_runs DISABLE TRIGGER USER")
    for age in range(history):  # oldest first, as they were written
        conn.execute(
            """INSERT INTO sync_runs (id, mailbox_id, status, requested_by, kind, requested_at,
                                      started_at, finished_at)
               SELECT gen_random_uuid(), id, 'done', 'scheduler', 'mailbox', t, t, t
                 FROM (SELECT id, now() - make_interval(secs => %s * %s + random() * %s) AS t
                         FROM mailboxes) AS m""",
            (interval, history - 1 - age, interval / 2))
    conn.execute("ALTER TABLE sync_runs ENABLE TRIGGER USER")
    conn.execute(
        """UPDATE mailboxes m SET sync_requested_at = r.at
             FROM (SELECT mailbox_id, max(requested_at) AS at FROM sync_runs
                    WHERE kind = 'mailbox' GROUP BY mailbox_id) AS r
            WHERE r.mailbox_id = m.id""")
    conn.execute("VACUUM ANALYZE mailboxes")  # as autovacuum would have, on a live table
    conn.execute("VACUUM ANALYZE sync_runs")
    return time.perf_counter() - started


def make_due(conn: db.Connection, count: int, interval: float) -> list[int]:
    """``count`` enabled mailboxes with working credentials whose latest run is now older
    than the interval (their runs moved back, as time would)."""
    ids = [r["id"] for r in conn.execute(
        """SELECT id FROM mailboxes WHERE sync_enabled AND credentials_invalid_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM sync_runs r WHERE r.mailbox_id = mailboxes.id
                                AND r.status IN ('queued', 'running'))
            ORDER BY random() LIMIT %s""", (count,)).fetchall()]
    conn.execute(
        """UPDATE sync_runs SET requested_at = requested_at - make_interval(secs => %s)
            WHERE mailbox_id = ANY(%s)""", (interval * 2, ids))
    conn.execute("ANALYZE sync_runs")
    return sorted(ids)


def timed_tick(conn: db.Connection, publisher: PublisherPool, settings: Settings) -> dict[str, Any]:
    """One ``tick``, with the seconds of each of its steps."""
    spent: dict[str, float] = {}
    originals = {name: getattr(handlers, name) for name in _STEPS}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = round(time.perf_counter() - started, 4)
        return timed

    for name, function in originals.items():
        setattr(handlers, name, wrap(name, function))
    try:
        started = time.perf_counter()
        queued = handlers.tick(conn, publisher.publish, settings, publisher.publish_many)
        total = time.perf_counter() - started
    finally:
        for name, function in originals.items():
            setattr(handlers, name, function)
    return {"queued": queued, "seconds": round(total, 4), "steps": spent}


def explain(conn: db.Connection, sql: str,
            params: tuple[Any, ...] | dict[str, Any]) -> list[str]:
    """The plan as run (in a transaction rolled back: the expiry is an UPDATE)."""
    try:
        with conn.transaction():
            rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", params).fetchall()
            raise _Rollback
    except _Rollback:
        pass
    return [r["QUERY PLAN"] for r in rows]


class _Rollback(Exception):
    pass


EXPIRE = """UPDATE sync_runs SET status = 'expired', finished_at = now()
             WHERE status = ANY(%s) AND requested_at < now() - make_interval(secs => %s)"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mailboxes", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=3, help="done runs per mailbox (3)")
    parser.add_argument("--few", type=int, default=100, help="due in the first tick (100)")
    parser.add_argument("--many", type=int, default=10_000, help="due in the last tick (10,000)")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"benchmark": "scheduler_tick", "machine": machine(),
                              "date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "mailboxes": args.mailboxes, "history_runs": args.history}
    ok = True
    with services.private_database() as url, services.private_vhost() as (_, broker_url), \
            db.connect(url, autocommit=True) as conn:
        db.migrate(url)
        settings = Settings(database_url=url, broker_url=broker_url)
        interval = settings.sync_interval
        report["populate_seconds"] = round(populate(conn, args.mailboxes, args.history,
                                                    interval), 2)
        # as the scheduler's main does: several publishers, their confirms overlapping
        publisher = PublisherPool(broker_url, settings.retry_delays, PARALLEL_PUBLISHES)
        try:
            handlers.tick(conn, publisher.publish, settings,  # connect, declare: not timed
                          publisher.publish_many)
            for case, count in (("few due", args.few), ("none due", 0), ("many due", args.many)):
                make_due(conn, count, interval)
                result = timed_tick(conn, publisher, settings)
                ok = ok and result["queued"] == count
                report[case] = {"due": count, **result}
                print(f"{case:<9} {count:>6} due: tick {result['seconds']:.3f} s "
                      f"(queued {result['queued']}; {result['steps']})", flush=True)
                conn.execute("UPDATE sync_runs SET status = 'done' WHERE status = 'queued'")
            make_due(conn, args.few, interval)
            report["explain_due"] = explain(conn, sync_requests.DUE_MAILBOXES, {"interval": interval})
            report["explain_expire"] = explain(conn, EXPIRE, (["queued", "running"],
                                                              settings.run_timeout))
        finally:
            publisher.close()
    print("\nEXPLAIN of the due query (few due):")
    print("\n".join("  " + line for line in report["explain_due"]))
    print("EXPLAIN of the expiry:")
    print("\n".join("  " + line for line in report["explain_expire"]))
    print()
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
