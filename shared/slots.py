"""Connection budgets: IMAP connections per account and per host, across the whole deployment.

Every IMAP connection a fetcher or a push watch opens first claims a slot in
``imap_connection_slots`` (one statement: ``mailferry_claim_connection``, migration 0017, counts
the live slots of the account, and of the host when it has a limit, under advisory locks, and
inserts one if the budget allows), and deletes it after logging out (one statement). The limits
come from ``budget.connection_limits``: the account's (setting, provider preset, or 10) and the
host's (``MAILFERRY_MAX_CONNECTIONS_PER_HOST``, unset by default).

A slot is a lease: its process renews all the slots it holds in one statement every third of
the lease (:class:`ConnectionSlots`' thread), so a process that dies frees its slots within a
lease period. A watch leaves the last slot of each budget to syncs (``reserve``): it holds its
connection for hours and would otherwise starve the syncs it triggers; with a budget of 1 an
account is not watched, and the schedule (and push's fallback) syncs it.

What happens when no slot is free is the caller's: a fetcher puts its command back for later
(``NoConnectionSlot``, a ``Postponed``: never a failed run, never a dead letter), a watch backs
off and tries again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum

import psycopg
import structlog

from mailferry import budget, db, metrics
from mailferry.config import Settings
from mailferry.errors import DatabaseUnavailable, NoConnectionSlot

log = structlog.get_logger(__name__)


class Purpose(StrEnum):
    SYNC = "sync"  # a fetcher's attempt (or slice)
    WATCH = "watch"  # a push watch, held for hours: leaves one slot of each budget to syncs


def prepare(conn: db.Connection) -> None:
    """Claims, releases and renewals do not wait for their commit to reach the disk: a slot is
    a lease that lives a minute, and losing the last few to a crash of PostgreSQL costs what a
    process that froze past its lease costs (a few connections over the budget until they
    close), while waiting for the flush would cost every sync two disk writes."""
    conn.execute("SET synchronous_commit = off")


def claim(conn: db.Connection, settings: Settings, *, holder: str, mailbox_id: int, host: str,
          username: str, purpose: Purpose, seconds: float) -> int | None:
    """A slot for one connection to ``username`` on ``host``, or None when the budget is full."""
    account_limit, host_limit = budget.connection_limits(host, settings)
    row = conn.execute(
        "SELECT mailferry_claim_connection(%s, %s, %s, %s, %s, %s, %s, %s, %s) AS slot",
        (budget.host_key(host), username.lower(), purpose, mailbox_id, holder, seconds,
         account_limit, host_limit, 1 if purpose == Purpose.WATCH else 0)).fetchone()
    return None if row is None or row["slot"] is None else int(row["slot"])


def release(conn: db.Connection, slot: int) -> None:
    conn.execute("DELETE FROM imap_connection_slots WHERE id = %s", (slot,))


def renew(conn: db.Connection, slots: list[int], seconds: float) -> set[int]:
    """Extend the given slots' leases; returns those still there (an expired one may be gone)."""
    rows = conn.execute(
        """UPDATE imap_connection_slots SET expires_at = now() + make_interval(secs => %s)
            WHERE id = ANY(%s) RETURNING id""", (seconds, slots)).fetchall()
    return {int(r["id"]) for r in rows}


def prune(conn: db.Connection) -> int:
    """Delete expired slots (a dead process's) whose account claims nothing any more."""
    return len(conn.execute(
        "DELETE FROM imap_connection_slots WHERE expires_at < now() RETURNING id").fetchall())


def refused(host: str, username: str, purpose: Purpose, settings: Settings) -> str:
    account_limit, host_limit = budget.connection_limits(host, settings)
    text = (f"no connection slot free for {username!r} on {budget.host_key(host)}: the account "
            f"allows {account_limit}")
    if host_limit is not None:
        text += f", the host {host_limit}"
    if purpose == Purpose.WATCH:
        text += " (a watch leaves one to syncs)"
    return text


class ConnectionSlots:
    """One process's slots, claimed and released on a connection of their own (one statement
    each, under a lock: callers are many threads), renewed by a thread while any is held."""

    def __init__(self, settings: Settings, holder: str, seconds: float) -> None:
        self.settings = settings
        self.holder = holder
        self.seconds = seconds
        self._connection = db.Reconnecting(settings.database_url)
        self._prepared: db.Connection | None = None
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _conn(self) -> db.Connection:
        conn = self._connection()
        if conn is not self._prepared:  # a new connection (the first, or after a reconnect)
            prepare(conn)
            self._prepared = conn
        return conn

    def claim(self, mailbox_id: int, host: str, username: str, purpose: Purpose) -> int | None:
        """A slot, or None when the budget is full (counted in the metrics)."""
        with self._lock:
            try:
                slot = claim(self._conn(), self.settings, holder=self.holder,
                             mailbox_id=mailbox_id, host=host, username=username,
                             purpose=purpose, seconds=self.seconds)
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(f"cannot claim a connection slot: {exc}") from exc
            if slot is None:
                metrics.SLOT_WAITS.labels(purpose).inc()
                return None
            self._held.add(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_loop, name="slots",
                                                daemon=True)
                self._thread.start()
        return slot

    def release(self, slot: int) -> None:
        """Free a slot after logout; if the database is away, it expires within a lease."""
        with self._lock:
            self._held.discard(slot)
            try:
                release(self._conn(), slot)
            except psycopg.Error as exc:
                log.warning("slots.release_failed", error=str(exc).splitlines()[0])

    @contextmanager
    def held(self, mailbox_id: int, host: str, username: str,
             purpose: Purpose) -> Iterator[int]:
        """A slot for the block (open the connection inside it, log out before it ends);
        ``NoConnectionSlot`` when none is free."""
        slot = self.claim(mailbox_id, host, username, purpose)
        if slot is None:
            raise NoConnectionSlot(refused(host, username, purpose, self.settings))
        try:
            yield slot
        finally:
            self.release(slot)

    @property
    def in_use(self) -> int:
        return len(self._held)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            with self._lock:
                held = sorted(self._held)
                if not held:
                    continue
                try:
                    kept = renew(self._conn(), held, self.seconds)
                except psycopg.Error as exc:  # they expire if the database stays away
                    log.warning("slots.renew_failed", error=str(exc).splitlines()[0])
                    continue
                lost = set(held) - kept
                self._held -= lost
            if lost:
                # Expired before we renewed them (the process froze longer than a lease): the
                # connections are still open, beyond the budget until they close.
                log.warning("slots.lost", slots=sorted(lost))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            self._connection.close()
