"""The fetcher's work: one SyncMailbox command -> folder and message events on the broker.

Plain functions; the IMAP connection, the database reads, the lease and the publisher are passed
in. The command is acked by the worker only after this returns, i.e. after every event of the
attempt was confirmed by the broker; a crash anywhere means the command comes back and another
attempt (with a newer fencing token) starts over, which the persister's idempotence absorbs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import structlog
from imapclient import IMAPClient

from services.fetcher import lease as leases
from shared import imap, repository
from shared.broker import Delivery
from shared.config import Settings
from shared.crypto import PasswordBox
from shared.db import Connection
from shared.domain import enabled_on_discovery, first_sync_since
from shared.errors import (
    ConfigError,
    ImapAuthError,
    ImapConnectionError,
    ImapError,
    LeaseLost,
    TransientError,
)
from shared.imap_library import (
    ImapConnectorFactory,
    ImapEmailFolderManager,
    ImapEmailManager,
    connector_factory,
)
from shared.messages import (
    AnyMessage,
    CredentialsInvalid,
    CredentialsRestored,
    FetchedMessage,
    FlagChange,
    FlagsChanged,
    FolderInfo,
    FoldersListed,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
    SyncFailed,
    SyncFinished,
    SyncFolders,
    SyncMailbox,
    SyncStarted,
)

log = structlog.get_logger(__name__)

META_ITEMS = ("FLAGS", "INTERNALDATE", "RFC822.SIZE")
META_CHUNK = 5000  # UIDs per metadata FETCH: keeps command lines far below servers' limits


@dataclass
class FetcherDeps:
    settings: Settings
    connection: Callable[[], Connection]  # autocommit; reads, the run row and the lease
    publish: Callable[[AnyMessage], None]
    passwords: PasswordBox
    fetcher_id: str
    connectors: ImapConnectorFactory = connector_factory  # IMAP sessions, per mailbox config
    today: Callable[[], date] = lambda: datetime.now(UTC).date()


def sync_mailbox(cmd: SyncMailbox | SyncFolders, deps: FetcherDeps,
                 delivery: Delivery | None = None) -> None:
    """One attempt at one run. A transient fault (refused, timed out, [UNAVAILABLE], or the
    connection lost in the middle of a folder) is recorded on the run and raised, so the worker
    retries it after a delay; on the last delivery it is recorded as the run's failure instead."""
    structlog.contextvars.bind_contextvars(mailbox_id=cmd.mailbox_id, run_id=str(cmd.run_id))
    started = time.monotonic()
    conn = deps.connection()
    mailbox = repository.get_mailbox(conn, cmd.mailbox_id)
    if mailbox is None:
        log.info("sync.skipped", reason="mailbox no longer exists")
        return
    # A command published by hand straight to the broker has no run yet: register it, unless
    # the mailbox already has a run queued or running (then this command is redundant).
    conn.execute(
        """INSERT INTO sync_runs (id, mailbox_id, status, force, requested_by, kind)
           VALUES (%s, %s, 'queued', %s, %s, %s) ON CONFLICT DO NOTHING""",
        (cmd.run_id, mailbox.id, cmd.force, cmd.requested_by,
         "folders" if isinstance(cmd, SyncFolders) else "mailbox"),
    )
    status = conn.execute("SELECT status FROM sync_runs WHERE id = %s", (cmd.run_id,)).fetchone()
    if status is None:
        log.info("sync.skipped", reason="another run of this mailbox is queued or running")
        return
    if status["status"] not in ("queued", "running"):
        log.info("sync.skipped", reason=f"run already {status['status']}")
        return

    s = deps.settings
    with leases.held(s.database_url, conn, mailbox.id, deps.fetcher_id,
                     s.lease_seconds) as lease:
        def event(cls: type[Any], **fields: Any) -> Any:
            return cls(run_id=cmd.run_id, mailbox_id=mailbox.id, lease_token=lease.token, **fields)

        deps.publish(event(SyncStarted, fetcher=deps.fetcher_id, started_at=_now()))
        try:
            config = mailbox.imap_config(deps.passwords, timeout=s.imap_timeout,
                                         ca_file=s.imap_ca_file,
                                         allow_private_networks=s.allow_private_networks)
            with deps.connectors.create_imap_connector(config) as connector:
                connector.connect()  # a refused login fails here, before anything is published
                if mailbox.credentials_invalid_at is not None or mailbox.last_error_kind == "auth":
                    deps.publish(CredentialsRestored(mailbox_id=mailbox.id, restored_at=_now()))
                totals = _sync_folders(cmd, deps, conn, ImapEmailManager(connector), mailbox,
                                       lease, event,
                                       retry_lost_connection=delivery is not None
                                       and not delivery.last)
        except (ImapError, ConfigError) as exc:
            kind = exc.kind if isinstance(exc, ImapError) else "config"
            if isinstance(exc, TransientError) and delivery is not None and not delivery.last:
                conn.execute(
                    """UPDATE sync_runs SET attempts = attempts + 1, error_kind = %s, error = %s
                        WHERE id = %s""",
                    (kind, str(exc), cmd.run_id),
                )
                log.warning("sync.retrying", error_kind=kind, error=str(exc),
                            attempt=delivery.attempt + 1)
                raise
            deps.publish(event(SyncFailed, error_kind=kind, error=str(exc), finished_at=_now()))
            if isinstance(exc, ImapAuthError):
                # Every refusal is told; the notifier tells people once per transition.
                deps.publish(CredentialsInvalid(mailbox_id=mailbox.id, run_id=cmd.run_id,
                                                error=str(exc), detected_at=_now()))
            log.warning("sync.failed", error_kind=kind, error=str(exc),
                        seconds=round(time.monotonic() - started, 3))
            return
        deps.publish(event(SyncFinished, folders=totals["folders"], finished_at=_now()))
    log.info("sync.fetched", seconds=round(time.monotonic() - started, 3), **totals)


def command_dead_lettered(cmd: AnyMessage, reason: str, deps: FetcherDeps) -> None:
    """A command that will not be retried any more closes its run as failed, so nobody waits on
    it (``sync --wait``) and the scheduler queues the mailbox again at the next interval."""
    if not isinstance(cmd, SyncMailbox | SyncFolders):
        return
    deps.connection().execute(
        """UPDATE sync_runs SET status = 'failed', finished_at = now(), error_kind = 'internal',
                  error = %s
            WHERE id = %s AND status IN ('queued', 'running')""",
        (f"gave up: {reason}"[:2000], cmd.run_id),
    )


def _sync_folders(cmd: SyncMailbox | SyncFolders, deps: FetcherDeps, conn: Connection,
                  manager: ImapEmailManager, mailbox: repository.Mailbox,
                  lease: leases.Lease,
                  event: Callable[..., Any], *,
                  retry_lost_connection: bool = False) -> dict[str, int]:
    client, where = manager.connector.client, manager.connector.where
    extensions = imap.enable_extensions(client, where)
    states = repository.folder_states(conn, mailbox.id)
    listed = ImapEmailFolderManager(manager.connector).list_folders()
    folders, renamed = _detect_renames(client, listed, states, where)
    deps.publish(event(FoldersListed, folders=tuple(folders), first_listing=not states))
    if isinstance(cmd, SyncFolders):
        return {"folders": 0, "failed_folders": 0, "messages": 0, "bytes": 0}
    days = mailbox.first_sync_days or deps.settings.first_sync_days
    totals = {"folders": 0, "failed_folders": 0, "messages": 0, "bytes": 0}
    # A renamed folder is synced under its new name from the next run on.
    to_sync = [
        f for f in folders
        if f.selectable and f.raw_name not in renamed
        and (states[f.raw_name].sync_enabled if f.raw_name in states
             else enabled_on_discovery(f, mailbox.initial_folders, first_listing=not states))
    ]
    conn.execute(
        """UPDATE sync_runs SET progress_token = %s, folders_total = %s, messages_found = 0
            WHERE id = %s""", (lease.token, len(to_sync), cmd.run_id))
    for index, folder in enumerate(to_sync):
        lease.check()
        totals["folders"] += 1
        structlog.contextvars.bind_contextvars(folder=folder.name)
        try:
            n, size = _sync_folder(manager, conn, folder, states.get(folder.raw_name), extensions,
                                   cmd, deps, lease, event,
                                   since=first_sync_since(deps.today(), days), where=where)
            totals["messages"] += n
            totals["bytes"] += size
        except LeaseLost:
            raise
        except ImapError as exc:
            if exc.kind == "connection" and retry_lost_connection:
                # The connection dropped mid-folder (reset, timeout): a transient fault, so the
                # attempt is retried after a delay like one before any folder work, rather than
                # the run failed. On the last delivery the folders are closed with the error.
                raise ImapConnectionError(str(exc)) from exc
            # One bad folder never stalls the mailbox (DESIGN invariant 5): close it with its
            # error (its checkpoint stays) and go on, unless the connection itself is gone:
            # then the folders not reached are closed with that error too.
            totals["failed_folders"] += 1
            deps.publish(event(FolderSynced, folder=folder.raw_name, uidvalidity=None,
                               batches=getattr(exc, "batches", 0), messages=0, error=str(exc)))
            log.warning("folder.failed", error=str(exc))
            if isinstance(exc, ImapConnectionError):
                for rest in to_sync[index + 1:]:
                    deps.publish(event(FolderSynced, folder=rest.raw_name, uidvalidity=None,
                                       batches=0, messages=0, error=f"not reached: {exc}"))
                    totals["folders"] += 1
                break
        finally:
            structlog.contextvars.unbind_contextvars("folder")
    return totals


def _detect_renames(client: IMAPClient, folders: list[FolderInfo],
                    states: dict[str, repository.FolderState],
                    where: str) -> tuple[list[FolderInfo], set[str]]:
    """IMAP has no rename notification, but a renamed folder keeps its UIDVALIDITY (RFC 3501
    6.3.5): when known folders vanished and new ones appeared, the new ones' UIDVALIDITY (one
    STATUS each) tells renames from deletions. Returns the folders, with UIDVALIDITY set on new
    ones, and the raw names that are renames of known folders."""
    listed = {f.raw_name for f in folders}
    gone = {s.uidvalidity for name, s in states.items() if name not in listed and s.uidvalidity}
    if not gone:
        return folders, set()
    out = [
        f.model_copy(update={"uidvalidity": imap.folder_uidvalidity(client, f.raw_name, where)})
        if f.raw_name not in states and f.selectable else f
        for f in folders
    ]
    renamed = {f.raw_name for f in out if f.uidvalidity is not None and f.uidvalidity in gone}
    if renamed:
        log.info("folders.renamed", new_names=sorted(renamed))
    return out, renamed


class _FolderFailed(ImapError):
    """An IMAP error after some batches of the folder were already published."""

    def __init__(self, cause: ImapError, batches: int) -> None:
        super().__init__(str(cause))
        self.kind = cause.kind
        self.batches = batches


def _sync_folder(manager: ImapEmailManager, conn: Connection, folder: FolderInfo,
                 state: repository.FolderState | None, extensions: imap.Extensions,
                 cmd: SyncMailbox | SyncFolders,
                 deps: FetcherDeps, lease: leases.Lease, event: Callable[..., Any], *,
                 since: date, where: str) -> tuple[int, int]:
    """Bring one folder's store up to the server: changes to known messages first (flags,
    expunges), then new UIDs. Every event is numbered; FolderSynced says how many there were."""
    s = deps.settings
    where = f"{where} {folder.raw_name}"
    client = manager.connector.client
    status = manager.select_folder(folder)  # EXAMINE: read-only, by its raw name
    same_generation = state is not None and state.uidvalidity == status.uidvalidity
    above = state.last_uid if (same_generation and state and not cmd.force) else 0
    batch_no = 0

    def publish(cls: type[Any], **fields: Any) -> None:
        nonlocal batch_no
        lease.check()
        deps.publish(event(cls, folder=folder.raw_name, uidvalidity=status.uidvalidity,
                           batch_no=batch_no, **fields))
        batch_no += 1

    changes = expunged = 0
    try:
        if state is not None and same_generation and state.last_uid:
            changes, expunged = _known_messages(client, conn, folder, state, status, extensions,
                                                publish, where)
        if above and status.uidnext is not None and status.uidnext <= above + 1:
            uids: list[int] = []  # UIDNEXT says nothing arrived: no SEARCH, no FETCH
        else:
            # Everything above the checkpoint, whatever its date; on a first sync, the window.
            query = manager.get_search_query_builder()
            query = query.uid(f"{above + 1}:*") if above else query.since(since)
            uids = manager.search_uids(query.get())
            conn.execute(  # progress for `sync --wait`; this attempt's only
                """UPDATE sync_runs SET messages_found = messages_found + %s
                    WHERE id = %s AND progress_token = %s""", (len(uids), cmd.run_id, lease.token))
        count = size_total = 0
        for batch in _batches(client, uids, s.batch_max_bytes, s.batch_max_messages,
                              s.max_message_bytes, where):
            publish(MessagesFetched, messages=tuple(batch))
            count += len(batch)
            size_total += sum(m.size for m in batch)
    except ImapError as exc:
        raise _FolderFailed(exc, batch_no) from exc
    last_uid = max([above, *uids, (status.uidnext or 1) - 1])
    deps.publish(event(FolderSynced, folder=folder.raw_name, uidvalidity=status.uidvalidity,
                       uidnext=status.uidnext, highest_modseq=status.highest_modseq,
                       last_uid=last_uid, batches=batch_no, messages=count))
    log.info("folder.fetched", messages=count, bytes=size_total, flag_changes=changes,
             expunged=expunged, events=batch_no, uidvalidity=status.uidvalidity,
             last_uid=last_uid, condstore=extensions.condstore, qresync=extensions.qresync)
    return count, size_total


def _known_messages(client: IMAPClient, conn: Connection, folder: FolderInfo,
                    state: repository.FolderState, status: imap.FolderStatus,
                    extensions: imap.Extensions, publish: Callable[..., None],
                    where: str) -> tuple[int, int]:
    """Flag changes and expunges among the UIDs already synced (1..last_uid).

    With CONDSTORE, an unchanged HIGHESTMODSEQ proves nothing changed (expunges raise it too,
    RFC 7162 section 3.1.2): no command is sent. Otherwise flags come from CHANGEDSINCE, or from a
    full FLAGS pass without CONDSTORE; expunges from VANISHED with QRESYNC, otherwise from
    comparing the server's UIDs with ours.
    """
    incremental = extensions.condstore and state.highest_modseq is not None
    if incremental and status.highest_modseq == state.highest_modseq:
        return 0, 0
    modifiers = [f"CHANGEDSINCE {state.highest_modseq}"] if incremental else []
    use_vanished = incremental and extensions.qresync
    if use_vanished:
        modifiers.append("VANISHED")
        imap.vanished(client)  # drop anything reported before this command
    items = ["FLAGS", "MODSEQ"] if extensions.condstore else ["FLAGS"]
    flags = imap.fetch(client, f"1:{state.last_uid}", items, where, modifiers)
    stored = repository.live_flags(conn, folder.raw_name, state, status.uidvalidity)
    # Only what differs from the store travels (a full pass without CONDSTORE sees every UID).
    changes = [
        FlagChange(uid=uid, flags=current, modseq=imap.modseq(info.get(b"MODSEQ")))
        for uid, info in sorted(flags.items())
        if uid in stored and frozenset(current := _clean_flags(info.get(b"FLAGS", ()))) != stored[uid]
    ]
    for start in range(0, len(changes), META_CHUNK):
        publish(FlagsChanged, changes=tuple(changes[start:start + META_CHUNK]))
    if use_vanished:
        gone = sorted(stored.keys() & imap.vanished(client))
    else:
        gone = sorted(stored.keys() - imap.existing_uids(client, state.last_uid, where))
    for start in range(0, len(gone), META_CHUNK):
        publish(MessagesExpunged, uids=tuple(gone[start:start + META_CHUNK]))
    return len(changes), len(gone)


def _clean_flags(flags: Any) -> tuple[str, ...]:
    # \Recent belongs to one IMAP session (RFC 3501 section 2.3.2): not a stored fact.
    return tuple(f for f in map(_flag, flags) if f.lower() != "\\recent")


def _batches(client: IMAPClient, uids: list[int], max_bytes: int, max_count: int,
             max_message: int, where: str) -> Iterator[list[FetchedMessage]]:
    """Messages in batches bounded by bytes and count; memory stays bounded by one batch (or one
    message larger than a batch)."""
    for start in range(0, len(uids), META_CHUNK):
        chunk = uids[start:start + META_CHUNK]
        meta = imap.fetch(client, chunk, META_ITEMS, where)
        group: list[int] = []
        group_bytes = 0
        for uid in chunk:
            info = meta.get(uid)
            if info is None:
                continue  # expunged since the SEARCH
            size = int(info.get(b"RFC822.SIZE", 0))
            if group and (group_bytes + size > max_bytes or len(group) >= max_count):
                yield _fetch_bodies(client, group, meta, max_message, where)
                group, group_bytes = [], 0
            group.append(uid)
            group_bytes += size
        if group:
            yield _fetch_bodies(client, group, meta, max_message, where)


def _fetch_bodies(client: IMAPClient, uids: list[int], meta: dict[int, dict[bytes, Any]],
                  max_message: int, where: str) -> list[FetchedMessage]:
    small = [u for u in uids if int(meta[u].get(b"RFC822.SIZE", 0)) <= max_message]
    bodies = imap.fetch(client, small, ("BODY.PEEK[]",), where)
    out: list[FetchedMessage] = []
    for uid in uids:
        info = meta[uid]
        flags = _clean_flags(info.get(b"FLAGS", ()))
        internal = info.get(b"INTERNALDATE")
        declared = int(info.get(b"RFC822.SIZE", 0))
        if uid not in small:
            out.append(FetchedMessage(uid=uid, flags=flags, internal_date=internal, size=declared,
                                      raw=None, skipped_reason=f"larger than {max_message} bytes"))
            continue
        body = bodies.get(uid, {}).get(b"BODY[]")
        if body is None:
            continue  # expunged between the two FETCHes
        raw = bytes(body)
        out.append(FetchedMessage(uid=uid, flags=flags, internal_date=internal, size=len(raw),
                                  raw=raw))
    return out


def _flag(flag: bytes | str) -> str:
    return flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)


def _now() -> datetime:
    return datetime.now(UTC)
