"""The persister's follow-up steps: background threads that finish what the insert left out.

- The **parse step** (:class:`Parser`, shared/parsing.py) fills the parsed columns of mail a
  first sync stored with its raw bytes only: the MIME parse was about half the persister's time
  on that path (issue 11), so a message counts as synced once its bytes and placement are
  stored, as mbsync counts a file, and is parsed right after.
- The **search indexer** (:class:`Indexer`, shared/search.py) fills the search vectors of parsed
  messages: building them costs about as much PostgreSQL time as storing the message.

Both work in batches while the persister's queue is quiet, so an initial sync runs at full
speed; under a load that never pauses each stops deferring after its ``max_defer`` seconds, so
it is never far behind. Their work is in the database (rows with NULL columns), so nothing is
lost when a persister dies: another one, or the next start, picks the rows up. Several
persisters work side by side: each batch skips rows another one holds. Readers do not wait for
them: a search parses and indexes what its mailbox still has waiting first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import structlog

from mailferry import db, parsing, search
from mailferry.db import Connection
from mailferry.errors import MailferryError

log = structlog.get_logger(__name__)

BATCH = 200
MAX_DEFER = 60.0  # seconds of busy queue after which indexing goes on regardless
PARSE_MAX_DEFER = 300.0  # the parse is the bigger cost: a long first sync keeps the CPU longer
QUIET = 2.0  # the queue counts as busy this long after an event was handled


class Background:
    """A thread that runs ``step(conn, limit=BATCH)`` while the queue is quiet, until it
    returns 0, then waits for more."""

    def __init__(self, name: str, step: Callable[..., int], database_url: str,
                 last_event: Callable[[], float], max_defer: float,
                 logged: tuple[str, str]) -> None:
        self._logged = logged  # the log lines of a batch done, and of a failure
        self._step = step
        self._max_defer = max_defer
        self._connection = db.Reconnecting(database_url)
        self._last_event = last_event  # time.monotonic() of the latest event handled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

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
                if now - deferred_since < self._max_defer:
                    self._stop.wait(1.0)
                    continue
            try:
                started = time.monotonic()
                done = self._step(self._connection(), limit=BATCH)
            except (psycopg.Error, MailferryError) as exc:  # PostgreSQL away: the rows wait
                log.warning(self._logged[1], error=(str(exc).splitlines() or [''])[0])
                self._stop.wait(5.0)
                continue
            if done:
                log.info(self._logged[0], messages=done,
                         seconds=round(time.monotonic() - started, 3))
            else:
                deferred_since = None
                self._stop.wait(QUIET)


class Indexer(Background):
    def __init__(self, database_url: str, last_event: Callable[[], float]) -> None:
        super().__init__("search-indexer", search.index_pending, database_url, last_event,
                         MAX_DEFER, ("search.indexed", "search.index_failed"))


class Parser(Background):
    def __init__(self, database_url: str, last_event: Callable[[], float]) -> None:
        super().__init__("parse-step", _parse, database_url, last_event, PARSE_MAX_DEFER,
                         ("parse.parsed", "parse.failed"))


def _parse(conn: Connection, *, limit: int) -> int:
    return parsing.parse_pending(conn, limit=limit)
