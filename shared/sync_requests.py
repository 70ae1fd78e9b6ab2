"""Asking for syncs: a run row, then its SyncMailbox command (the scheduler and the CLI alike).

The run row is committed before the command is published, so every command has a run; a
partial unique index allows one queued-or-running run per mailbox, so two schedulers (or a
scheduler and an operator) can never queue the same mailbox twice. A run whose command could not be
published is marked failed at once; one whose publisher crashed in between is expired by the
scheduler after MAILFERRY_RUN_TIMEOUT.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mailferry import metrics, runs
from mailferry.db import Connection
from mailferry.errors import BrokerUnavailable
from mailferry.messages import AnyMessage, SyncFolders, SyncMailbox


@dataclass(frozen=True)
class Requested:
    mailbox_id: int
    run_id: uuid.UUID
    queued: bool  # False: a run was already queued or running, and that one is returned


def request_syncs(conn: Connection, publish: Callable[[AnyMessage], None],
                  mailbox_ids: Iterable[int], *, requested_by: str,
                  force: bool = False, folders_only: bool = False,
                  wait_behind_folder_runs: float = 0.0) -> list[Requested]:
    """Queue runs; a mailbox with a run already queued or running gets that run back. A mail
    sync asked for while a (short) folder-list run is active can wait for it to end
    (``wait_behind_folder_runs`` seconds), so the mail is synced, not merely the folders."""
    out: list[Requested] = []
    for mailbox_id in mailbox_ids:
        deadline = time.monotonic() + wait_behind_folder_runs
        while (requested := _request_one(conn, publish, mailbox_id, requested_by, force,
                                         folders_only)) is None:
            if time.monotonic() > deadline:
                active = runs.active(conn, mailbox_id)
                if active is None:
                    continue  # it just finished: try again
                requested = Requested(mailbox_id, active.id, queued=False)
                break
            time.sleep(0.2)
        out.append(requested)
    return out


def _request_one(conn: Connection, publish: Callable[[AnyMessage], None], mailbox_id: int,
                 requested_by: str, force: bool, folders_only: bool) -> Requested | None:
    """None: a folder-list run is in the way of a mail sync."""
    with conn.transaction():
        run_id = runs.request(conn, mailbox_id,
                              kind=runs.RunKind.FOLDERS if folders_only else runs.RunKind.MAILBOX,
                              force=force, requested_by=requested_by)
    if run_id is None:
        active = runs.active(conn, mailbox_id)
        if active is None or (active.kind == runs.RunKind.FOLDERS and not folders_only):
            return None  # it just finished, or only lists folders: try again
        return Requested(mailbox_id, active.id, queued=False)
    try:
        command = SyncFolders if folders_only else SyncMailbox
        publish(command(run_id=run_id, mailbox_id=mailbox_id, force=force,
                        requested_by=requested_by))
    except BrokerUnavailable as exc:
        runs.publish_failed(conn, run_id, str(exc))
        raise
    metrics.RUNS_REQUESTED.labels(metrics.reason(requested_by)).inc()
    return Requested(mailbox_id, run_id, queued=True)


def due_mailboxes(conn: Connection, interval_seconds: float) -> list[int]:
    """Enabled mailboxes with working credentials, nothing queued or running, and no run asked
    for within the interval (a failed run waits too: no hammering a broken server). A throttled
    mailbox waits until its ``throttled_until``, and is due then (its sync did not happen)."""
    rows = conn.execute(
        """SELECT m.id FROM mailboxes m
             CROSS JOIN LATERAL (SELECT COALESCE(max(r.requested_at), '-infinity') AS at
                                   FROM sync_runs r
                                  WHERE r.mailbox_id = m.id AND r.kind = 'mailbox') last
            WHERE m.sync_enabled AND m.credentials_invalid_at IS NULL
              AND (m.throttled_until IS NULL OR m.throttled_until <= now())
              AND NOT EXISTS (SELECT 1 FROM sync_runs r WHERE r.mailbox_id = m.id
                                 AND r.status IN ('queued', 'running'))
              AND (last.at <= now() - make_interval(secs => %s)
                   OR last.at < m.throttled_until)
            ORDER BY m.id""",
        (interval_seconds,),
    ).fetchall()
    return [r["id"] for r in rows]


def expire_stale_runs(conn: Connection, timeout_seconds: float) -> int:
    return runs.expire(conn, timeout_seconds)
