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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from mailferry import runs
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
                  wait_behind_folder_runs: float = 0.0,
                  folders: Sequence[str] | None = None) -> list[Requested]:
    """Queue runs; a mailbox with a run already queued or running gets that run back. A mail
    sync asked for while a (short) folder-list run is active can wait for it to end
    (``wait_behind_folder_runs`` seconds), so the mail is synced, not merely the folders.
    ``folders`` (raw names) limits the mail syncs to those enabled folders (push)."""
    out: list[Requested] = []
    for mailbox_id in mailbox_ids:
        deadline = time.monotonic() + wait_behind_folder_runs
        while (requested := _request_one(conn, publish, mailbox_id, requested_by, force,
                                         folders_only, folders)) is None:
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
                 requested_by: str, force: bool, folders_only: bool,
                 folders: Sequence[str] | None = None) -> Requested | None:
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
        if folders_only:
            publish(SyncFolders(run_id=run_id, mailbox_id=mailbox_id, force=force,
                                requested_by=requested_by))
        else:
            publish(SyncMailbox(run_id=run_id, mailbox_id=mailbox_id, force=force,
                                requested_by=requested_by,
                                folders=None if folders is None else tuple(folders)))
    except BrokerUnavailable as exc:
        runs.publish_failed(conn, run_id, str(exc))
        raise
    return Requested(mailbox_id, run_id, queued=True)


def due_mailboxes(conn: Connection, interval_seconds: float) -> list[int]:
    """Enabled mailboxes with working credentials, nothing queued or running, and no run asked
    for within the interval (a failed run waits too: no hammering a broken server). Push runs
    (of the folders that changed) do not count: the schedule stays the full safety net."""
    rows = conn.execute(
        """SELECT m.id FROM mailboxes m
            WHERE m.sync_enabled AND m.credentials_invalid_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM sync_runs r WHERE r.mailbox_id = m.id
                                 AND r.status IN ('queued', 'running'))
              AND COALESCE((SELECT max(r.requested_at) FROM sync_runs r
                             WHERE r.mailbox_id = m.id AND r.kind = 'mailbox'
                               AND r.requested_by <> 'push'), '-infinity')
                  <= now() - make_interval(secs => %s)
            ORDER BY m.id""",
        (interval_seconds,),
    ).fetchall()
    return [r["id"] for r in rows]


def expire_stale_runs(conn: Connection, timeout_seconds: float) -> int:
    return runs.expire(conn, timeout_seconds)
