"""The persister's work: one event -> one committed transaction.

Events may arrive twice and in any order (several workers, redeliveries): every write is keyed by
what identifies the fact, and an event from a fetcher attempt whose lease was taken over (an older
fencing token) is refused. MIME parsing of new mail happens before the transaction opens, so a
slow parse never holds locks; mail of a first sync is parsed later, by the parse step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from mailferry import outbox, runs
from mailferry.db import Connection
from mailferry.errors import PermanentError, Postponed, TransientError
from mailferry.messages import (
    AnyMessage,
    FetcherEvent,
    FlagsChanged,
    FoldersListed,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
    SyncCompleted,
    SyncFailed,
    SyncFinished,
    SyncStarted,
)
from mailferry.mime import parse_message
from mailferry.services.persister import store

log = structlog.get_logger(__name__)


@dataclass
class PersisterDeps:
    connection: Callable[[], Connection]  # a live autocommit connection (reconnects if needed)


#: Seconds a batch of a folder not in the store (new, or renamed in this run) waits, in its
#: thread, for its run's listing (stored at that moment by another thread, most often) before it
#: is postponed through a retry queue.
LISTING_WAITS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def handle(event: FetcherEvent, deps: PersisterDeps) -> None:
    """Apply one event in one transaction: refused when fenced off, or when it names another
    mailbox's run. A deadlock is retried by the broker like any transient fault, and logged. A
    batch of a folder not in the store waits for its run's listing (``store.waits_for_listing``):
    a moment in this thread, then ``Postponed``."""
    apply = _APPLY[type(event)]
    structlog.contextvars.bind_contextvars(type=type(event).__name__, mailbox_id=event.mailbox_id,
                                           run_id=str(event.run_id))
    started = time.monotonic()
    prepared = _prepare(event, deps.connection())
    for wait in (*LISTING_WAITS, None):
        try:
            outcome = _apply(event, apply, prepared, deps.connection())
        except _ListingFirst as exc:
            if wait is None:
                raise Postponed(str(exc)) from exc
            time.sleep(wait)
            continue
        if outcome is not None:
            summary, status = outcome
            log.info("event.applied", seconds=round(time.monotonic() - started, 4),
                     run_status=status, **summary)
        return


class _ListingFirst(Exception):
    """A batch of a folder not in the store, whose run's listing is not stored yet."""


def _apply(event: FetcherEvent, apply: Callable[[Connection, Any, Any, Changes], Applied],
           prepared: Any, conn: Connection) -> tuple[dict[str, Any], str | None] | None:
    """The event's transaction; None when it was refused (fenced off, mailbox gone)."""
    try:
        with conn.transaction():
            token = store.current_token(conn, event.mailbox_id)
            if token is None:
                log.info("event.dropped", reason="mailbox no longer exists")
                return None
            if event.lease_token < token:
                log.warning("event.fenced", lease_token=event.lease_token, current=token)
                return None
            # The run row first (the lock order of shared.runs): the events of one run are
            # applied one at a time, each seeing what the ones before it committed.
            run = runs.lock(conn, event.run_id)
            if run is not None and run.mailbox_id != event.mailbox_id:
                # the run-level writes (batches, checkpoints, status) are keyed by run
                raise PermanentError(f"run {event.run_id} belongs to mailbox {run.mailbox_id}, "
                                     f"not to mailbox {event.mailbox_id}")
            if isinstance(event, MessagesFetched | FlagsChanged | MessagesExpunged) and \
                    store.waits_for_listing(conn, run, event.mailbox_id, event.folder):
                raise _ListingFirst(f"folder {event.folder!r} is not in the store and its run's "
                                    "listing (which makes or renames it) is not stored yet")
            changes: list[outbox.Change] = []
            summary, progress = apply(conn, event, prepared, changes)
            status = store.settle(conn, event.mailbox_id, event.run_id, event.lease_token,
                                  progress) if progress is not None else None
            outbox.append(conn, event.mailbox_id, changes)  # last: the mailbox row's lock
    except psycopg.DataError as exc:
        # a value the schema cannot hold: the same event fails the same way every time, so it
        # goes to the dead letters at once rather than after the whole retry budget
        raise PermanentError(
            f"the database refuses this event: {exc.diag.message_primary}") from exc
    except psycopg.errors.DeadlockDetected as exc:
        log.warning("event.deadlock", error=str(exc).splitlines()[0])
        raise TransientError(f"deadlock: {str(exc).splitlines()[0]}") from exc
    return summary, status


def event_given_up(event: AnyMessage, exc: BaseException, deps: PersisterDeps) -> None:
    """An event that will not be stored makes its run incomplete for good: close it as failed
    (the next run fetches what is missing, since checkpoints did not move past it)."""
    if isinstance(event, FetcherEvent):  # keyed by run and mailbox: never another's run
        runs.give_up(deps.connection(), event.run_id, event.mailbox_id,
                     f"{type(event).__name__} not stored: {type(exc).__name__}: {exc}")


def _prepare(event: FetcherEvent, conn: Connection) -> Any:
    """CPU work done outside the transaction: hashing, and the MIME parse of new mail.

    Mail at or below its folder's checkpoint (a first sync, a UIDVALIDITY reset, a re-scan:
    the change stream's ``backfill``) is stored with its raw bytes only, and counts as synced
    as mbsync counts a file; the parse step fills its parsed columns afterwards
    (shared/parsing.py), off the path of the sync. New mail above the checkpoint is parsed
    here, so it is announced with its subject at once. Bytes the mailbox holds already (a
    copy, a redelivery) are not parsed twice."""
    if not isinstance(event, MessagesFetched):
        return None
    # A message recognised under a new UID after a UIDVALIDITY change names the stored bytes
    # by their hash instead of carrying them again.
    hashes = [store.sha256(m.raw) if m.raw is not None
              else bytes.fromhex(m.sha256) if m.sha256 else None for m in event.messages]
    known = store.known_hashes(conn, event.mailbox_id, [h for h in hashes if h])
    above = store.checkpoint_uid(conn, event.mailbox_id, event.folder, event.uidvalidity)
    incoming = []
    for m, h in zip(event.messages, hashes, strict=True):
        new = m.raw is not None and h not in known
        parse_now = new and above is not None and m.uid > above
        incoming.append(store.Incoming(fetched=m, sha256=h, new=new,
                                       parsed=parse_message(m.raw or b"") if parse_now else None))
    return incoming


Applied = tuple[dict[str, Any], runs.Progress | None]


# Each applier writes the event and adds to ``changes`` what it changed in the store (the change
# stream, shared/outbox.py): a snapshot of the rows it touches before, the difference after.
Changes = list[outbox.Change]


def _on_started(conn: Connection, e: SyncStarted, _: Any, changes: Changes) -> Applied:
    return {}, runs.Progress(started_at=e.started_at, token=e.lease_token)


def _on_folders(conn: Connection, e: FoldersListed, _: Any, changes: Changes) -> Applied:
    before = outbox.folders_before(conn, e.mailbox_id)
    counts = store.upsert_folders(conn, e.mailbox_id, e.folders,
                                  store.initial_folders(conn, e.mailbox_id), e.first_listing,
                                  e.selection)
    changes += outbox.folder_changes(conn, e.mailbox_id, before, f"{e.run_id}/{e.lease_token}")
    return counts, runs.Progress(folders_listed=True)


def _on_messages(conn: Connection, e: MessagesFetched, incoming: list[store.Incoming],
                 changes: Changes) -> Applied:
    folder = store.folder_id(conn, e.mailbox_id, e.folder)
    uids = [m.uid for m in e.messages]
    before = outbox.messages_before(conn, e.mailbox_id, folder, e.uidvalidity, uids,
                                    [m.sha256 for m in incoming if m.sha256])
    store.store_messages(conn, e.mailbox_id, folder, e.uidvalidity, incoming, e.lease_token)
    changes += outbox.message_changes(conn, e.mailbox_id, folder, e.uidvalidity, uids, before,
                                      e.lease_token)
    new_batch = store.batch_stored(conn, e.run_id, e.lease_token, e.folder, e.batch_no,
                                   len(e.messages))
    summary = {"folder": e.folder, "messages": len(e.messages),
               "parsed": sum(1 for m in incoming if m.parsed),
               "parse_deferred": sum(1 for m in incoming if m.new and not m.parsed),
               "duplicate_batch": not new_batch}
    return summary, runs.Progress(messages_stored=len(e.messages) if new_batch else 0)


def _on_flags(conn: Connection, e: FlagsChanged, _: Any, changes: Changes) -> Applied:
    folder = store.folder_id(conn, e.mailbox_id, e.folder)
    uids = [c.uid for c in e.changes]
    before = outbox.messages_before(conn, e.mailbox_id, folder, e.uidvalidity, uids)
    store.apply_flags(conn, folder, e.uidvalidity, e.changes, e.lease_token)
    changes += outbox.message_changes(conn, e.mailbox_id, folder, e.uidvalidity, uids, before,
                                      e.lease_token)
    store.batch_stored(conn, e.run_id, e.lease_token, e.folder, e.batch_no, 0)
    return {"folder": e.folder, "changes": len(e.changes)}, runs.Progress()


def _on_expunged(conn: Connection, e: MessagesExpunged, _: Any, changes: Changes) -> Applied:
    folder = store.folder_id(conn, e.mailbox_id, e.folder)
    before = outbox.messages_before(conn, e.mailbox_id, folder, e.uidvalidity, e.uids)
    store.expunge(conn, folder, e.uidvalidity, e.uids)
    changes += outbox.message_changes(conn, e.mailbox_id, folder, e.uidvalidity, e.uids, before,
                                      e.lease_token)
    store.batch_stored(conn, e.run_id, e.lease_token, e.folder, e.batch_no, 0)
    return {"folder": e.folder, "expunged": len(e.uids)}, runs.Progress()


def _on_folder_synced(conn: Connection, e: FolderSynced, _: Any, changes: Changes) -> Applied:
    store.folder_synced(conn, e)
    return {"folder": e.folder, "batches": e.batches, "error": e.error}, runs.Progress()


def _on_finished(conn: Connection, e: SyncFinished, _: Any, changes: Changes) -> Applied:
    return {"folders": e.folders}, runs.Progress(folders_expected=e.folders, token=e.lease_token)


def _on_completed(conn: Connection, e: SyncCompleted, _: Any, changes: Changes) -> Applied:
    """A whole attempt without message data: its events applied in order, in this one
    transaction, so the outcome is theirs (run, folders, checkpoints, change stream)."""
    progress = runs.Progress()
    for part in e.parts():
        _, step = _APPLY[type(part)](conn, part, None, changes)
        progress = progress.then(step)
    return {"folders": len(e.synced), "listed": len(e.folders),
            "failed_folders": sum(1 for f in e.synced if f.error)}, progress


def _on_failed(conn: Connection, e: SyncFailed, _: Any, changes: Changes) -> Applied:
    runs.fail(conn, e.run_id, e.mailbox_id, e.error_kind, e.error, e.finished_at)
    return {"error_kind": e.error_kind, "error": e.error}, None


_APPLY: dict[type, Callable[[Connection, Any, Any, Changes], Applied]] = {
    SyncStarted: _on_started,
    FoldersListed: _on_folders,
    MessagesFetched: _on_messages,
    FlagsChanged: _on_flags,
    MessagesExpunged: _on_expunged,
    FolderSynced: _on_folder_synced,
    SyncFinished: _on_finished,
    SyncCompleted: _on_completed,
    SyncFailed: _on_failed,
}

# What the worker dispatches to: every event type the persister stores, and nothing else (the
# worker dead-letters any other type with its reason).
HANDLERS: dict[type, Callable[[Any, PersisterDeps], None]] = {kind: handle for kind in _APPLY}
