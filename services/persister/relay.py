"""The relay: publishes the change outbox to the ``mailferry.changes`` exchange.

It lives in the persister process, as a thread beside the worker (like the search indexer): the
persister writes the outbox, so wherever changes are made a relay runs, and a long event in the
worker never holds the stream up. One relay publishes at a time across all persisters (a
PostgreSQL session advisory lock; the others wait for it), which keeps each mailbox's changes in
order; PostgreSQL releases the lock when its holder dies, even by SIGKILL, and another takes
over.

At least once: a row is marked published only after RabbitMQ confirmed it (publisher confirms,
persistent messages); a relay killed in between publishes it again, with the same ``id``. It
wakes on the ``NOTIFY`` of a committing writer (or every second), and prunes rows published
longer than ``MAILFERRY_CHANGES_RETENTION`` ago.
"""

from __future__ import annotations

import json
import threading
import time

import structlog

from mailferry import db, outbox, topology
from mailferry.broker import Outgoing, Publisher
from mailferry.messages import change_routing_key

log = structlog.get_logger(__name__)

_RELAY_LOCK = 0x6D66636867  # "mfchg"
BATCH = 500
PRUNE_EVERY = 300.0  # seconds


def publish_pending(conn: db.Connection, publisher: Publisher, limit: int = BATCH) -> int:
    """Publish up to ``limit`` unpublished rows in order, all confirmed, then mark them."""
    rows = outbox.pending(conn, limit)
    # not mandatory: no application listening is normal; the rows stay for `list`
    publisher.publish_many([
        Outgoing(body=json.dumps(row["payload"], ensure_ascii=False,
                                 separators=(",", ":")).encode(),
                 routing_key=change_routing_key(row["mailbox_id"], row["type"]),
                 type_=row["type"],
                 headers={"schema-version": row["payload"].get("version", 1)})
        for row in rows], exchange=topology.CHANGES.name)
    if rows:
        outbox.published(conn, [r["id"] for r in rows])
    return len(rows)


class Relay:
    def __init__(self, database_url: str, publisher: Publisher, retention_seconds: float,
                 idle_wait: float = 1.0) -> None:
        self.database_url = database_url
        self.publisher = publisher
        self.retention_seconds = retention_seconds
        self.idle_wait = idle_wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="changes-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        conn: db.Connection | None = None
        leading, next_prune = False, 0.0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = db.connect(self.database_url, autocommit=True)
                    conn.execute(f"LISTEN {outbox.CHANNEL}")
                    leading = False
                if not leading:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok",
                                       (_RELAY_LOCK,)).fetchone()
                    leading = bool(row and row["ok"])
                    if not leading:
                        self._stop.wait(self.idle_wait)
                        continue
                    log.info("relay.leading")
                if time.monotonic() >= next_prune:
                    pruned = outbox.prune(conn, self.retention_seconds)
                    next_prune = time.monotonic() + PRUNE_EVERY
                    if pruned:
                        log.info("relay.pruned", rows=pruned)
                published = publish_pending(conn, self.publisher)
                if published:
                    log.info("relay.published", changes=published)
                else:
                    for _ in conn.notifies(timeout=self.idle_wait, stop_after=1):
                        pass
            except Exception as exc:  # the broker or the database away: try again shortly
                log.warning("relay.failed", error=str(exc).splitlines()[0] if str(exc) else
                            type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(self.idle_wait)
        if conn is not None:
            conn.close()
