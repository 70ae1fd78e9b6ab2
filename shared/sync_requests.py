"""Asking for syncs: a run row, then its SyncMailbox command (the scheduler and the CLI alike).

The run row is committed before the command is published, so every command has a run; a
partial unique index allows one queued-or-running run per mailbox, so two schedulers (or a
scheduler and an operator) can never queue the same mailbox twice. A run whose command could not be
published is marked failed at once (or, published in a batch, withdrawn: see ``publish_many``);
one whose publisher crashed in between is expired by the scheduler after MAILFERRY_RUN_TIMEOUT.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


#: Runs queued per statement before their commands are published: a crash between the two
#: leaves at most this many runs to expire (MAILFERRY_RUN_TIMEOUT).
CHUNK = 500

Command = SyncMailbox | SyncFolders
#: (published, failed with their error, never tried)
_Outcome = tuple[list[Command], list[tuple[Command, BrokerUnavailable]], list[Command]]


def request_syncs(conn: Connection, publish: Callable[[AnyMessage], None],
                  mailbox_ids: Iterable[int], *, requested_by: str,
                  force: bool = False, folders_only: bool = False,
                  wait_behind_folder_runs: float = 0.0, parallel: int = 1,
                  folders: Sequence[str] | None = None,
                  publish_many: Callable[[Sequence[AnyMessage]], None] | None = None,
                  ) -> list[Requested]:
    """Queue runs; a mailbox with a run already queued or running gets that run back. A mail
    sync asked for while a (short) folder-list run is active can wait for it to end
    (``wait_behind_folder_runs`` seconds), so the mail is synced, not merely the folders.

    The runs are inserted in bulk, a chunk per statement (a tick with thousands of due
    mailboxes pays one round trip per chunk, not per mailbox), then their commands published,
    ``parallel`` at a time (give a ``publish`` that can: ``app.publishing.PublisherPool``).
    If the broker fails, the run whose command failed is marked failed and the
    rest of the chunk is withdrawn: those mailboxes are due again at the next tick.
    ``folders`` (raw names) limits the mail syncs to those enabled folders (push).
    ``publish_many`` (``Publisher.publish_many``) publishes a chunk's commands with one wait
    for their confirms instead of one each; if it fails, which of them RabbitMQ took is
    unknown, so every run of the chunk still queued is withdrawn (due again at the next tick)
    and a command that did arrive registers its run again at the fetcher, or finds another
    run active and is skipped (``services/fetcher/handlers.py``)."""
    ids = list(dict.fromkeys(mailbox_ids))
    kind = runs.RunKind.FOLDERS if folders_only else runs.RunKind.MAILBOX
    only = None if folders is None else tuple(folders)
    out: dict[int, Requested] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        with conn.transaction():
            queued = runs.request_many(conn, chunk, kind=kind, force=force,
                                       requested_by=requested_by)
        commands: list[Command] = [
            SyncFolders(run_id=queued[m], mailbox_id=m, force=force, requested_by=requested_by)
            if folders_only else
            SyncMailbox(run_id=queued[m], mailbox_id=m, force=force, requested_by=requested_by,
                        folders=only)
            for m in chunk if m in queued]
        outcome: _Outcome = (commands, [], [])
        if publish_many is not None and len(commands) > 1:
            try:
                publish_many(commands)
            except Exception:
                runs.withdraw(conn, [m.run_id for m in commands])
                raise
        else:
            outcome = _publish_all(publish, commands, parallel)
        published, failed, skipped = outcome
        if published:  # queued, whatever befalls the rest of the chunk
            metrics.RUNS_REQUESTED.labels(metrics.reason(requested_by)).inc(len(published))
        if failed:
            for message, exc in failed:
                runs.publish_failed(conn, message.run_id, str(exc))
            runs.withdraw(conn, [m.run_id for m in skipped])
            raise failed[0][1]
        out.update((m.mailbox_id, Requested(m.mailbox_id, m.run_id, queued=True))
                   for m in published)
        for mailbox_id in chunk:  # a run was already there (or a folder-list run is in the way)
            if mailbox_id not in out:
                out[mailbox_id] = _request_waiting(conn, publish, mailbox_id, requested_by,
                                                   force, folders_only, wait_behind_folder_runs,
                                                   folders)
    return [out[m] for m in ids]


def _publish_all(publish: Callable[[AnyMessage], None], commands: list[Command],
                 parallel: int) -> _Outcome:
    """(published, failed with their error, never tried): after a failure, no more is tried."""
    published: list[Command] = []
    failed: list[tuple[Command, BrokerUnavailable]] = []
    skipped: list[Command] = []
    lock = threading.Lock()

    def one(message: Command) -> None:
        if failed:
            with lock:
                skipped.append(message)
            return
        try:
            publish(message)
        except BrokerUnavailable as exc:
            with lock:
                failed.append((message, exc))
            return
        with lock:
            published.append(message)

    if parallel <= 1 or len(commands) <= 1:
        for message in commands:
            one(message)
    else:
        with ThreadPoolExecutor(min(parallel, len(commands))) as pool:
            list(pool.map(one, commands))
    return published, failed, skipped


def _request_waiting(conn: Connection, publish: Callable[[AnyMessage], None], mailbox_id: int,
                     requested_by: str, force: bool, folders_only: bool,
                     wait_behind_folder_runs: float,
                     folders: Sequence[str] | None) -> Requested:
    deadline = time.monotonic() + wait_behind_folder_runs
    while (requested := _request_one(conn, publish, mailbox_id, requested_by, force,
                                     folders_only, folders)) is None:
        if time.monotonic() > deadline:
            active = runs.active(conn, mailbox_id)
            if active is None:
                continue  # it just finished: try again
            return Requested(mailbox_id, active.id, queued=False)
        time.sleep(0.2)
    return requested


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
    metrics.RUNS_REQUESTED.labels(metrics.reason(requested_by)).inc()
    return Requested(mailbox_id, run_id, queued=True)


# Two index range scans: the mailboxes whose interval is over (a throttled one among them waits
# for its back-off: a filter after the scan, throttled mailboxes are few), and the ones whose
# back-off ended since their last request (due at once, whatever the interval).
DUE_MAILBOXES = """
SELECT due.id FROM (
    SELECT m.id FROM mailboxes m
     WHERE m.sync_enabled AND m.credentials_invalid_at IS NULL AND m.removing_at IS NULL
       AND m.sync_requested_at <= now() - make_interval(secs => %(interval)s)
       AND (m.throttled_until IS NULL OR m.throttled_until <= now())
    UNION
    SELECT m.id FROM mailboxes m
     WHERE m.sync_enabled AND m.credentials_invalid_at IS NULL AND m.removing_at IS NULL
       AND m.throttled_until IS NOT NULL AND m.throttled_until <= now()
       AND m.sync_requested_at < m.throttled_until
) due
 WHERE NOT EXISTS (SELECT 1 FROM sync_runs r WHERE r.mailbox_id = due.id
                      AND r.status IN ('queued', 'running'))
 ORDER BY due.id"""


def due_mailboxes(conn: Connection, interval_seconds: float) -> list[int]:
    """Enabled mailboxes with working credentials, nothing queued or running, and no run asked
    for within the interval (a failed run waits too: no hammering a broken server). Push runs
    (of the folders that changed) do not count: the schedule stays the full safety net (the
    trigger of migrations 0011/0014 leaves them out of ``sync_requested_at``). A throttled
    mailbox waits until its ``throttled_until``, and is due then (its sync did not happen).
    One range scan of ``mailboxes_due_idx`` (migration 0011) and one of
    ``mailboxes_throttled_idx`` (0016): the cost follows the due and the throttled mailboxes,
    not the table."""
    rows = conn.execute(DUE_MAILBOXES, {"interval": interval_seconds}).fetchall()
    return [r["id"] for r in rows]


def expire_stale_runs(conn: Connection, timeout_seconds: float) -> int:
    return runs.expire(conn, timeout_seconds)
