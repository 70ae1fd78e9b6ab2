"""The scheduler's work: one tick -> one SyncMailbox per due mailbox."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from mailferry.config import Settings
from mailferry.db import Connection
from mailferry.messages import AnyMessage
from mailferry.sync_requests import due_mailboxes, expire_stale_runs, request_syncs

log = structlog.get_logger(__name__)

#: Commands published at once by a tick (main.py gives it as many publishers): a quorum queue
#: confirms each after its disk write, so one at a time costs about 10 ms per due mailbox.
PARALLEL_PUBLISHES = 8


def tick(conn: Connection, publish: Callable[[AnyMessage], None], settings: Settings) -> int:
    """Expire runs that never finished, then queue every due mailbox. Safe to run in several
    schedulers at once: the one-active-run index lets only one of them queue a mailbox."""
    expired = expire_stale_runs(conn, settings.run_timeout)
    due = due_mailboxes(conn, settings.sync_interval)
    requested = request_syncs(conn, publish, due, requested_by="scheduler",
                              parallel=PARALLEL_PUBLISHES)
    queued = sum(1 for r in requested if r.queued)
    log.info("schedule.tick", due=len(due), queued=queued, expired=expired)
    return queued
