"""The scheduler's work: one tick -> one SyncMailbox per due mailbox."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from mailferry import slots
from mailferry.app.publishing import PARALLEL_PUBLISHES
from mailferry.config import Settings
from mailferry.db import Connection
from mailferry.messages import AnyMessage
from mailferry.sync_requests import due_mailboxes, expire_stale_runs, request_syncs

log = structlog.get_logger(__name__)


def tick(conn: Connection, publish: Callable[[AnyMessage], None], settings: Settings,
         publish_many: Callable[[Sequence[AnyMessage]], None] | None = None) -> int:
    """Expire runs that never finished (and prune expired connection slots), then queue every
    due mailbox. Safe to run in several schedulers at once: the one-active-run index lets only
    one of them queue a mailbox. Commands go out in batches with one wait for their confirms
    (``publish_many``; main.py gives a PublisherPool's), or else PARALLEL_PUBLISHES at a time."""
    expired = expire_stale_runs(conn, settings.run_timeout)
    slots.prune(conn)  # a dead process's connection slots, expired
    due = due_mailboxes(conn, settings.sync_interval)
    requested = request_syncs(conn, publish, due, requested_by="scheduler",
                              parallel=PARALLEL_PUBLISHES, publish_many=publish_many)
    queued = sum(1 for r in requested if r.queued)
    log.info("schedule.tick", due=len(due), queued=queued, expired=expired)
    return queued
