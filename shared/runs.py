"""The sync run's life cycle: the one module that writes ``sync_runs``.

::

    request ──> queued ──record(started)──> running ──finish──> done | failed
               │  ↺ waiting            └──fail / give_up / throttled──> failed
                  └──────────expire (MAILFERRY_RUN_TIMEOUT)──> expired

(``waiting``: no IMAP connection slot was free; the run stays queued and its command comes back.)

A run is what someone asked for (the scheduler, an operator, a push); attempts at it are fetcher
deliveries, each with its fencing token (``lease_token``): only the newest attempt's events move
the run. Every transition is one function here, over :class:`RunStatus` and ``ErrorKind``; the
fetcher, the persister, the scheduler and the CLI call them and write the table nowhere else
(``tests/unit/test_runs.py`` fails if they do).

Lock order, kept by every persister transaction that touches a run: the run row first
(:func:`lock`, before anything else is written), then folder rows (by id), then the mailbox row.
The events of one run are therefore applied one at a time, whichever persister holds them: none
of them deadlock, and each sees everything the ones before it committed (so the last piece of a
folder or run, whichever persister stores it, always closes it). Different runs, hence different
mailboxes, still go in parallel; MIME parsing happens before the transaction.

A run that fails, and the credentials it proves refused or working again, are announced on the
change stream (``shared/outbox.py``) in the transaction that records them: MailboxSyncFailed,
CredentialsInvalid (the first refusal after they worked), CredentialsRestored (a completed run
after a refusal). The outbox takes the mailbox row's lock, the last of the order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from mailferry import outbox
from mailferry.db import Connection
from mailferry.errors import ErrorKind, backoff
from mailferry.messages import (
    MailboxCredentialsInvalid,
    MailboxCredentialsRestored,
    MailboxSyncFailed,
)
from mailferry.mime import clean_text


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"


class RunKind(StrEnum):
    MAILBOX = "mailbox"  # folders and mail
    FOLDERS = "folders"  # the folder list only (a selection changed)


ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
_ACTIVE = [str(s) for s in ACTIVE]


@dataclass(frozen=True)
class Run:
    id: uuid.UUID
    mailbox_id: int
    status: RunStatus
    kind: RunKind
    lease_token: int | None
    folders_listed: bool
    folders_expected: int | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


_COLUMNS = "id, mailbox_id, status, kind, lease_token, folders_listed, folders_expected"


def _run(row: dict[str, Any] | None) -> Run | None:
    if row is None:
        return None
    return Run(id=row["id"], mailbox_id=int(row["mailbox_id"]), status=RunStatus(row["status"]),
               kind=RunKind(row["kind"]), lease_token=row["lease_token"],
               folders_listed=row["folders_listed"], folders_expected=row["folders_expected"])


# --- reads --------------------------------------------------------------------------------------


def get(conn: Connection, run_id: uuid.UUID) -> Run | None:
    return _run(conn.execute(f"SELECT {_COLUMNS} FROM sync_runs WHERE id = %s",
                             (run_id,)).fetchone())


def active(conn: Connection, mailbox_id: int) -> Run | None:
    """The mailbox's queued or running run (at most one: a partial unique index)."""
    return _run(conn.execute(
        f"SELECT {_COLUMNS} FROM sync_runs WHERE mailbox_id = %s AND status = ANY(%s)",
        (mailbox_id, _ACTIVE)).fetchone())


def lock(conn: Connection, run_id: uuid.UUID) -> Run | None:
    """The run, locked for the rest of the transaction: the first lock an event of the run takes."""
    return _run(conn.execute(f"SELECT {_COLUMNS} FROM sync_runs WHERE id = %s FOR UPDATE",
                             (run_id,)).fetchone())


# --- transitions --------------------------------------------------------------------------------


def request(conn: Connection, mailbox_id: int, *, kind: RunKind, force: bool,
            requested_by: str, run_id: uuid.UUID | None = None) -> uuid.UUID | None:
    """Queue a run; None when the mailbox already has one queued or running."""
    row = conn.execute(
        """INSERT INTO sync_runs (id, mailbox_id, status, force, requested_by, kind)
           VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id""",
        (run_id or uuid.uuid4(), mailbox_id, RunStatus.QUEUED, force, requested_by, kind),
    ).fetchone()
    return None if row is None else uuid.UUID(str(row["id"]))


def request_many(conn: Connection, mailbox_ids: Sequence[int], *, kind: RunKind, force: bool,
                 requested_by: str) -> dict[int, uuid.UUID]:
    """Queue a run for each mailbox in one statement; returns mailbox -> new run for those
    that had none queued or running (the others are left out). Inserted in mailbox order, so
    two requesters of overlapping sets wait on each other instead of deadlocking."""
    ids = sorted(set(mailbox_ids))
    rows = conn.execute(
        """INSERT INTO sync_runs (id, mailbox_id, status, force, requested_by, kind)
           SELECT r.id, r.mailbox_id, %s, %s, %s, %s
             FROM unnest(%s::bigint[], %s::uuid[]) AS r (mailbox_id, id)
            WHERE EXISTS (SELECT 1 FROM mailboxes m WHERE m.id = r.mailbox_id)
            ORDER BY r.mailbox_id
           ON CONFLICT DO NOTHING RETURNING id, mailbox_id""",
        (RunStatus.QUEUED, force, requested_by, kind, ids, [uuid.uuid4() for _ in ids]),
    ).fetchall()
    return {int(r["mailbox_id"]): uuid.UUID(str(r["id"])) for r in rows}


def withdraw(conn: Connection, run_ids: Sequence[uuid.UUID]) -> None:
    """Queued runs whose command was never published (the broker went away first): gone, as
    if never asked for, so that their mailboxes are due again at the next tick."""
    conn.execute("DELETE FROM sync_runs WHERE id = ANY(%s) AND status = %s",
                 (list(run_ids), RunStatus.QUEUED))


def publish_failed(conn: Connection, run_id: uuid.UUID, error: str) -> None:
    """The run's command never reached the broker: nobody will work on it."""
    with conn.transaction():
        _close(conn, run_id, RunStatus.FAILED, ErrorKind.BROKER, error)


def retrying(conn: Connection, run_id: uuid.UUID, kind: ErrorKind, error: str) -> None:
    """An attempt failed in a way a later one may not (the server away, a timeout)."""
    conn.execute(
        """UPDATE sync_runs SET attempts = attempts + 1, error_kind = %s, error = %s
            WHERE id = %s AND status = ANY(%s)""",
        (kind, clean_text(error)[:2000], run_id, _ACTIVE),
    )


def waiting(conn: Connection, run_id: uuid.UUID, mailbox_id: int, reason: str, *,
            base: float, cap: float) -> float:
    """An attempt could not start: every connection slot of the account (or host) is taken
    (``shared/slots.py``). The run stays queued, never failed: it records why and counts the
    wait among its ``attempts``; its command comes back after the returned seconds (``base``
    doubling with each wait of the run, at most ``cap``, with jitter: half fixed, half random),
    and meanwhile the mailbox shows ``throttled_until`` (never shortened: a provider's back-off
    stays). A completed sync clears it, as it clears a throttle."""
    with conn.transaction():
        row = conn.execute(
            """UPDATE sync_runs SET attempts = attempts + 1, error_kind = %s, error = %s
                WHERE id = %s AND status = ANY(%s) RETURNING attempts""",
            (ErrorKind.THROTTLED, clean_text(reason)[:2000], run_id, _ACTIVE)).fetchone()
        waits = int(row["attempts"]) if row else 1
        seconds = backoff(waits, base, cap)
        conn.execute(
            """UPDATE mailboxes SET throttled_until = GREATEST(throttled_until,
                      now() + make_interval(secs => %s))
                WHERE id = %s""", (seconds, mailbox_id))
    return seconds


def planned(conn: Connection, run_id: uuid.UUID, token: int, folders: int, *,
            listing: bool = True) -> None:
    """The attempt's plan, for `sync --wait`'s progress: the folders it will sync.
    ``listing=False``: the attempt lists no folders (a push run syncing folders it knows), so
    the run's end waits for no FoldersListed; written before any event that could end it."""
    conn.execute(
        """UPDATE sync_runs SET progress_token = %s, folders_total = %s, messages_found = 0,
                  folders_listed = folders_listed OR %s
            WHERE id = %s""", (token, folders, not listing, run_id))


def found(conn: Connection, run_id: uuid.UUID, token: int, messages: int) -> None:
    """Messages the attempt found to fetch (progress); another attempt's count is left alone."""
    conn.execute(
        """UPDATE sync_runs SET messages_found = messages_found + %s
            WHERE id = %s AND progress_token = %s""", (messages, run_id, token))


@dataclass(frozen=True)
class Progress:
    """What one stored event tells its run."""

    started_at: datetime | None = None  # SyncStarted: the attempt ``token`` began
    folders_listed: bool = False
    folders_expected: int | None = None  # SyncFinished: how many folders the attempt closed
    token: int | None = None  # ... and whose attempt that was
    messages_stored: int = 0

    def then(self, later: Progress | None) -> Progress:
        """This progress followed by ``later``'s: what several events of one attempt, applied
        in one transaction (a SyncCompleted), tell their run together."""
        if later is None:
            return self
        return Progress(
            started_at=self.started_at or later.started_at,
            folders_listed=self.folders_listed or later.folders_listed,
            folders_expected=(later.folders_expected if later.folders_expected is not None
                              else self.folders_expected),
            token=max((t for t in (self.token, later.token) if t is not None), default=None),
            messages_stored=self.messages_stored + later.messages_stored)


def record(conn: Connection, run: Run, progress: Progress) -> Run:
    """Apply an event's progress to a locked run; returns the run as it now is."""
    if progress == Progress():
        return run
    started = progress.started_at is not None
    updated = _run(conn.execute(
        f"""UPDATE sync_runs
               SET status = CASE WHEN %s AND status = ANY(%s) THEN %s ELSE status END,
                   started_at = COALESCE(started_at, %s),
                   folders_listed = folders_listed OR %s,
                   folders_expected = COALESCE(%s, folders_expected),
                   lease_token = GREATEST(lease_token, %s),
                   messages_stored = messages_stored + %s
             WHERE id = %s RETURNING {_COLUMNS}""",
        (started, _ACTIVE, RunStatus.RUNNING, progress.started_at,
         progress.folders_listed, progress.folders_expected, progress.token,
         progress.messages_stored, run.id)).fetchone())
    assert updated is not None
    return updated


def finish(conn: Connection, run: Run, error: str | None) -> RunStatus:
    """Every folder of the attempt is closed: done, or failed naming the folders that failed.
    The mailbox's last sync follows; a completed attempt proves the credentials work."""
    status = RunStatus.FAILED if error else RunStatus.DONE
    kind = ErrorKind.FOLDER if error else None
    _close(conn, run.id, status, kind, error)
    was = _credentials(conn, run.mailbox_id)
    conn.execute(
        """UPDATE mailboxes SET last_sync_at = now(), last_sync_status = %s, last_error = %s,
                  last_error_kind = %s, credentials_invalid_at = NULL,
                  throttled_until = NULL, throttle_count = 0
            WHERE id = %s""",
        (status, error, kind, run.mailbox_id),
    )
    if was is not None and (was["credentials_invalid_at"] is not None
                            or was["last_error_kind"] == ErrorKind.AUTH):
        outbox.append(conn, run.mailbox_id, [outbox.Change(
            outbox.change_id(run.mailbox_id, "credentials-restored", run.id),
            MailboxCredentialsRestored)])
    return status


def fail(conn: Connection, run_id: uuid.UUID, mailbox_id: int, kind: ErrorKind, error: str,
         at: datetime) -> None:
    """The attempt failed as a whole (SyncFailed); refused credentials mark the mailbox."""
    with conn.transaction():
        _fail(conn, run_id, mailbox_id, kind, error, at)


def _fail(conn: Connection, run_id: uuid.UUID, mailbox_id: int, kind: ErrorKind, error: str,
          at: datetime) -> None:
    _close(conn, run_id, RunStatus.FAILED, kind, error, at)
    was = _credentials(conn, mailbox_id)
    conn.execute(
        """UPDATE mailboxes
              SET last_sync_at = %s, last_sync_status = %s, last_error = %s,
                  last_error_kind = %s,
                  credentials_invalid_at = CASE WHEN %s THEN COALESCE(credentials_invalid_at, %s)
                      ELSE credentials_invalid_at END
            WHERE id = %s""",
        (at, RunStatus.FAILED, clean_text(error), kind, kind == ErrorKind.AUTH, at, mailbox_id),
    )
    if kind == ErrorKind.AUTH and was is not None and was["credentials_invalid_at"] is None:
        outbox.append(conn, mailbox_id, [outbox.Change(
            outbox.change_id(mailbox_id, "credentials-invalid", run_id),
            MailboxCredentialsInvalid, {"error": clean_text(error)[:2000]})])


def throttled(conn: Connection, run_id: uuid.UUID, mailbox_id: int, error: str, *,
              base: float, cap: float, suggested: float | None = None) -> datetime:
    """The provider limits the account: the run fails with ``throttled`` (never "credentials
    invalid", never retried at once) and the mailbox is backed off until the returned time:
    ``base`` doubling with each throttle in a row, at most ``cap``, with jitter (half of it
    fixed, half random, so that mailboxes throttled together do not come back together), and
    never sooner than the server's own suggestion. The scheduler skips it until then.

    On the change stream it is a failed run like any other (MailboxSyncFailed, with
    ``error_kind`` "throttled"), in the same transaction."""
    with conn.transaction():
        return _throttled(conn, run_id, mailbox_id, error, base=base, cap=cap,
                          suggested=suggested)


def _throttled(conn: Connection, run_id: uuid.UUID, mailbox_id: int, error: str, *,
               base: float, cap: float, suggested: float | None) -> datetime:
    _close(conn, run_id, RunStatus.FAILED, ErrorKind.THROTTLED, error)
    count = conn.execute(
        """UPDATE mailboxes
              SET throttle_count = throttle_count + 1,
                  last_sync_at = now(), last_sync_status = %(status)s, last_error = %(error)s,
                  last_error_kind = %(kind)s
            WHERE id = %(id)s RETURNING throttle_count""",
        {"status": RunStatus.FAILED, "error": clean_text(error)[:2000],
         "kind": ErrorKind.THROTTLED, "id": mailbox_id},
    ).fetchone()
    assert count is not None
    seconds = max(suggested or 0.0, backoff(int(count["throttle_count"]), base, cap))
    row = conn.execute(
        """UPDATE mailboxes SET throttled_until = now() + make_interval(secs => %s)
            WHERE id = %s RETURNING throttled_until""", (seconds, mailbox_id)).fetchone()
    assert row is not None
    until: datetime = row["throttled_until"]
    return until


def give_up(conn: Connection, run_id: uuid.UUID, mailbox_id: int, reason: str,
            kind: ErrorKind = ErrorKind.INTERNAL) -> None:
    """A message of the run will not be processed any more (retries exhausted, or it can never
    succeed): the run can no longer complete, so it is closed as failed. Keyed by run and
    mailbox, so a message naming another mailbox's run cannot fail that run."""
    with conn.transaction():
        closed = conn.execute(
            """UPDATE sync_runs SET status = %s, finished_at = now(), error_kind = %s, error = %s
                WHERE id = %s AND mailbox_id = %s AND status = ANY(%s) RETURNING id""",
            (RunStatus.FAILED, kind, clean_text(reason)[:2000], run_id, mailbox_id, _ACTIVE),
        ).fetchone()
        if closed is not None:
            _announce_failure(conn, mailbox_id, run_id, kind, reason)


def expire(conn: Connection, timeout_seconds: float) -> int:
    """Runs still active after ``timeout_seconds`` (a lost command, a crashed publisher)."""
    rows = conn.execute(
        """UPDATE sync_runs SET status = %s, finished_at = now(), error_kind = %s,
                  error = 'no result within MAILFERRY_RUN_TIMEOUT'
            WHERE status = ANY(%s) AND requested_at < now() - make_interval(secs => %s)
        RETURNING id""",
        (RunStatus.EXPIRED, ErrorKind.TIMEOUT, _ACTIVE, timeout_seconds),
    ).fetchall()
    return len(rows)


def _close(conn: Connection, run_id: uuid.UUID, status: RunStatus, kind: ErrorKind | None,
           error: str | None, at: datetime | None = None) -> None:
    closed = conn.execute(
        """UPDATE sync_runs SET status = %s, finished_at = COALESCE(%s, now()), error_kind = %s,
                  error = %s
            WHERE id = %s AND status = ANY(%s) RETURNING mailbox_id""",
        (status, at, kind, clean_text(error)[:2000] if error else None, run_id, _ACTIVE),
    ).fetchone()
    if closed is not None and status == RunStatus.FAILED:
        _announce_failure(conn, int(closed["mailbox_id"]), run_id, kind or ErrorKind.INTERNAL,
                          error or "")


def _announce_failure(conn: Connection, mailbox_id: int, run_id: uuid.UUID, kind: ErrorKind,
                      error: str) -> None:
    outbox.append(conn, mailbox_id, [outbox.Change(
        outbox.change_id(mailbox_id, "sync-failed", run_id), MailboxSyncFailed,
        {"run_id": run_id, "error_kind": kind, "error": clean_text(error)[:2000]})])


def _credentials(conn: Connection, mailbox_id: int) -> dict[str, Any] | None:
    """The mailbox's credential state, locked (the mailbox row: the last lock of the order)."""
    return conn.execute(
        """SELECT credentials_invalid_at, last_error_kind FROM mailboxes WHERE id = %s
            FOR UPDATE""", (mailbox_id,)).fetchone()
