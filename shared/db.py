"""PostgreSQL connections and schema migrations.

Migrations are yoyo SQL files in ``shared/migrations``. Every service migrates at start-up, so two
processes may start at once: a PostgreSQL advisory lock serialises them, and because PostgreSQL
releases it when the holder's connection ends, a process killed mid-migration cannot leave the
database locked (yoyo's own lock row can go stale that way, so it is cleared under ours).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from mailferry.errors import ConfigError, DatabaseUnavailable

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x6D61696C66  # "mailf"


def mailbox_lock_key(mailbox_id: int) -> int:
    """The advisory lock of one mailbox's fencing token (shared by writers, exclusive for a
    takeover); far from the migration lock's key."""
    return (1 << 62) | mailbox_id

Connection = psycopg.Connection[dict[str, Any]]


def connect(url: str, *, autocommit: bool = False) -> Connection:
    try:
        return psycopg.connect(url, row_factory=dict_row, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        reason = _first_line(exc)
        if "does not exist" in reason or "authentication failed" in reason:
            # Waiting will not help: the configuration is wrong.
            raise ConfigError(f"cannot use PostgreSQL: {reason.split('FATAL:')[-1].strip()}; "
                              "check MAILFERRY_DATABASE_URL (create the database with "
                              "`createdb` first)") from exc
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {reason}") from exc


class Reconnecting:
    """A callable that returns a live autocommit connection, reconnecting after it broke (the
    database restarted, or an operator terminated the backend)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Connection | None = None

    def __call__(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.url, autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class ReconnectingPerThread:
    """:class:`Reconnecting`, one connection per thread: for handlers running on several threads
    at once (a psycopg connection runs one transaction at a time)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Reconnecting] = []

    def __call__(self) -> Connection:
        mine: Reconnecting | None = getattr(self._local, "conn", None)
        if mine is None:
            mine = self._local.conn = Reconnecting(self.url)
            with self._lock:
                self._all.append(mine)
        return mine()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()


def migrate(url: str) -> list[str]:
    """Apply pending migrations; returns the ids applied (empty when up to date)."""
    from yoyo import get_backend, read_migrations  # services need it, most CLI commands not

    with connect(url, autocommit=True) as lock_conn:
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            backend = get_backend(_yoyo_url(url))
            backend.break_lock()  # safe: we hold the advisory lock, no one else migrates
            migrations = read_migrations(str(MIGRATIONS))
            with backend.lock():
                pending = backend.to_apply(migrations)
                backend.apply_migrations(pending)
            applied = [m.id for m in pending]
            backend.connection.close()
            return applied
        finally:
            lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def migrate_when_ready(url: str, timeout: float = 120.0) -> list[str]:
    """Migrate, waiting for PostgreSQL to accept connections (it may still be starting, as in
    docker-compose)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return migrate(url)
        except DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _yoyo_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
        raise ValueError(f"MAILFERRY_DATABASE_URL must be a postgresql:// URL, got {scheme!r}")
    return f"postgresql+psycopg://{rest}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
