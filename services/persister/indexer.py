"""The persister's background search indexer: fills the search vectors of stored messages.

Building a message's vectors costs about as much PostgreSQL time as storing it, so the insert
leaves them empty and this thread fills them, in batches, while the persister's queue is quiet:
an initial sync runs at full speed and its mail becomes searchable right after. Under a load that
never pauses it stops deferring after MAX_DEFER seconds, so the index is never far behind.
Several persisters index side by side: each batch skips rows another one holds. A search does
not wait for this: it indexes what its mailbox still has waiting first (shared/search.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import structlog

from mailferry import db, search
from mailferry.errors import MailferryError

log = structlog.get_logger(__name__)

BATCH = 200
MAX_DEFER = 60.0  # seconds of busy queue after which indexing goes on regardless
QUIET = 2.0  # the queue counts as busy this long after an event was handled


class Indexer:
    def __init__(self, database_url: str, last_event: Callable[[], float]) -> None:
        self._connection = db.Reconnecting(database_url)
        self._last_event = last_event  # time.monotonic() of the latest event handled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="search-indexer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._connection.close()

    def _run(self) -> None:
        deferred_since: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self._last_event() < QUIET:
                deferred_since = deferred_since or now
                if now - deferred_since < MAX_DEFER:
                    self._stop.wait(1.0)
                    continue
            try:
                started = time.monotonic()
                done = search.index_pending(self._connection(), limit=BATCH)
            except (psycopg.Error, MailferryError) as exc:  # PostgreSQL away: the rows wait
                log.warning("search.index_failed", error=(str(exc).splitlines() or [''])[0])
                self._stop.wait(5.0)
                continue
            if done:
                log.info("search.indexed", messages=done,
                         seconds=round(time.monotonic() - started, 3))
            else:
                deferred_since = None
                self._stop.wait(QUIET)
