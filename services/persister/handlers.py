"""The persister's work: one event -> one committed transaction.

Events may arrive twice and in any order (several workers, redeliveries): every write is keyed by
what identifies the fact, and an event from a fetcher attempt whose lease was taken over (an older
fencing token) is refused. MIME parsing happens before the transaction opens, so a slow parse
never holds locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog

from services.persister import store
from shared.db import Connection
from shared.errors import PermanentError
from shared.messages import (
    AnyMessage,
    FetcherEvent,
    FlagsChanged,
    FoldersListed,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
    SyncFailed,
    SyncFinished,
    SyncStarted,
)
from shared.mime import parse_message

log = structlog.get_logger(__name__)

_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass
class PersisterDeps:
    connection: Callable[[], Connection]  # a live autocommit connection (reconnects if needed)


def handle(event: AnyMessage, deps: PersisterDeps) -> None:
    handler = _HANDLERS.get(type(event))
    if handler is None or not isinstance(event, FetcherEvent):
        log.warning("event.ignored", type=event.type)
        return
    structlog.contextvars.bind_contextvars(type=event.type, mailbox_id=event.mailbox_id,
                                           run_id=str(event.run_id))
    try:
        _apply(event, handler, deps)
    except psycopg.DataError as exc:
        # a value the schema cannot hold: the same event fails the same way every time, so it
        # goes to the dead letters at once rather than after the whole retry budget
        raise PermanentError(
            f"the database refuses this event: {exc.diag.message_primary}") from exc


def _apply(event: FetcherEvent, handler: Callable[[Connection, Any, Any], dict[str, Any]],
           deps: PersisterDeps) -> None:
    started = time.monotonic()
    prepared = _prepare(event, deps.connection())
    for attempt in range(5):
        conn = deps.connection()
        try:
            with conn.transaction():
                token = store.current_token(conn, event.mailbox_id)
                if token is None:
                    log.info("event.dropped", reason="mailbox no longer exists")
                    return
                if event.lease_token < token:
                    log.warning("event.fenced", lease_token=event.lease_token, current=token)
                    return
                owner = store.run_mailbox(conn, event.run_id)
                if owner is not None and owner != event.mailbox_id:
                    # the run-level writes (batches, checkpoints, status) are keyed by run
                    raise PermanentError(f"run {event.run_id} belongs to mailbox {owner}, "
                                         f"not to mailbox {event.mailbox_id}")
                summary = handler(conn, event, prepared)
            break
        except _RETRYABLE:
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    log.info("event.applied", seconds=round(time.monotonic() - started, 4), **(summary or {}))


def event_dead_lettered(event: AnyMessage, reason: str, deps: PersisterDeps) -> None:
    """An event that will not be stored makes its run incomplete for good: close it as failed
    (the next run fetches what is missing, since checkpoints did not move past it)."""
    run_id = getattr(event, "run_id", None)
    mailbox_id = getattr(event, "mailbox_id", None)
    if run_id is not None and mailbox_id is not None:  # never another mailbox's run
        store.run_gave_up(deps.connection(), run_id, mailbox_id,
                          f"{event.type} not stored: {reason}")


def _prepare(event: FetcherEvent, conn: Connection) -> Any:
    """CPU work done outside the transaction: hashing, and MIME parsing of the messages this
    mailbox does not hold yet (a copy or a redelivery is not parsed twice)."""
    if not isinstance(event, MessagesFetched):
        return None
    # A message recognised under a new UID after a UIDVALIDITY change names the stored bytes
    # by their hash instead of carrying them again.
    hashes = [store.sha256(m.raw) if m.raw is not None
              else bytes.fromhex(m.sha256) if m.sha256 else None for m in event.messages]
    known = store.known_hashes(conn, event.mailbox_id, [h for h in hashes if h])
    return [
        store.Incoming(
            fetched=m,
            sha256=h,
            parsed=parse_message(m.raw) if m.raw is not None and h not in known else None,
        )
        for m, h in zip(event.messages, hashes, strict=True)
    ]


def _on_started(conn: Connection, e: SyncStarted, _: Any) -> dict[str, Any]:
    store.run_started(conn, e.run_id, e.lease_token, e.started_at)
    return {}


def _on_folders(conn: Connection, e: FoldersListed, _: Any) -> dict[str, Any]:
    counts = store.upsert_folders(conn, e.mailbox_id, e.folders,
                                  store.initial_folders(conn, e.mailbox_id), e.first_listing,
                                  e.selection)
    store.run_folders_listed(conn, e.run_id)
    status = store.try_complete(conn, e.run_id, e.lease_token)
    return {**counts, "run_status": status}


def _on_messages(conn: Connection, e: MessagesFetched,
                 incoming: list[store.Incoming]) -> dict[str, Any]:
    parsed = incoming
    folder = store.folder_id(conn, e.mailbox_id, e.folder)
    store.store_messages(conn, e.mailbox_id, folder, e.uidvalidity, parsed, e.lease_token)
    new_batch = store.batch_stored(conn, e.run_id, e.lease_token, e.folder, e.batch_no,
                                   len(e.messages))
    status = store.try_complete(conn, e.run_id, e.lease_token)
    return {"folder": e.folder, "messages": len(e.messages),
            "parsed": sum(1 for m in parsed if m.parsed), "duplicate_batch": not new_batch,
            "run_status": status}


def _on_flags(conn: Connection, e: FlagsChanged, _: Any) -> dict[str, Any]:
    store.apply_flags(conn, store.folder_id(conn, e.mailbox_id, e.folder), e.uidvalidity,
                      e.changes, e.lease_token)
    return _batch_done(conn, e, len(e.changes), "changes")


def _on_expunged(conn: Connection, e: MessagesExpunged, _: Any) -> dict[str, Any]:
    store.expunge(conn, store.folder_id(conn, e.mailbox_id, e.folder), e.uidvalidity, e.uids)
    return _batch_done(conn, e, len(e.uids), "expunged")


def _batch_done(conn: Connection, e: FlagsChanged | MessagesExpunged, n: int,
                what: str) -> dict[str, Any]:
    store.batch_stored(conn, e.run_id, e.lease_token, e.folder, e.batch_no, 0)
    return {"folder": e.folder, what: n,
            "run_status": store.try_complete(conn, e.run_id, e.lease_token)}


def _on_folder_synced(conn: Connection, e: FolderSynced, _: Any) -> dict[str, Any]:
    store.folder_synced(conn, e)
    status = store.try_complete(conn, e.run_id, e.lease_token)
    return {"folder": e.folder, "batches": e.batches, "error": e.error, "run_status": status}


def _on_finished(conn: Connection, e: SyncFinished, _: Any) -> dict[str, Any]:
    store.run_finished(conn, e.run_id, e.lease_token, e.folders)
    status = store.try_complete(conn, e.run_id, e.lease_token)
    return {"folders": e.folders, "run_status": status}


def _on_failed(conn: Connection, e: SyncFailed, _: Any) -> dict[str, Any]:
    store.run_failed(conn, e.run_id, e.mailbox_id, e.error_kind, e.error, e.finished_at)
    return {"error_kind": e.error_kind, "error": e.error}


_HANDLERS: dict[type, Callable[[Connection, Any, Any], dict[str, Any]]] = {
    SyncStarted: _on_started,
    FoldersListed: _on_folders,
    MessagesFetched: _on_messages,
    FlagsChanged: _on_flags,
    MessagesExpunged: _on_expunged,
    FolderSynced: _on_folder_synced,
    SyncFinished: _on_finished,
    SyncFailed: _on_failed,
}
