"""One fetcher attempt at one run: the lease it holds, the events it stamps, the run it moves.

An attempt holds back its small events (SyncStarted, FoldersListed, the FolderSynced of folders
without batches) until it publishes message data, and then publishes them first. An attempt that
ends without any (a no-op sync: nothing new, changed or expunged) publishes them with its
SyncFinished as one :class:`SyncCompleted`, which the persister applies in one transaction
instead of four or more. Nothing held is lost by a crash: the command was not acked, and the
next attempt starts over.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from mailferry import metrics, repository, runs
from mailferry.db import Connection
from mailferry.errors import ErrorKind
from mailferry.messages import (
    AnyMessage,
    FolderInfo,
    FolderSelection,
    FoldersListed,
    FolderSynced,
    MessagesFetched,
    SyncCompleted,
    SyncFailed,
    SyncFinished,
    SyncStarted,
)
from mailferry.services.fetcher import lease as leases
from mailferry.services.fetcher.planning import Stamp

log = structlog.get_logger(__name__)


class Attempt:
    """Every event goes out stamped with the run, the mailbox and this attempt's fencing token,
    and only while the lease is ours (``LeaseLost`` otherwise)."""

    def __init__(self, run_id: uuid.UUID, mailbox_id: int, lease: leases.Lease, conn: Connection,
                 publish: Callable[[AnyMessage], None]) -> None:
        self.stamp = Stamp(run_id=run_id, mailbox_id=mailbox_id, lease_token=lease.token)
        self.lease = lease
        self._conn = conn
        self._publish = publish
        # The small events held back; None: publishing them as they come.
        self._held: list[SyncStarted | FoldersListed | FolderSynced] | None = None

    def publish(self, message: AnyMessage) -> None:
        self.lease.check()
        if self._held is not None:
            if isinstance(message, SyncStarted | FoldersListed) or (
                    isinstance(message, FolderSynced) and not message.batches):
                self._held.append(message)
                return
            self.flush()
        self._publish(message)
        if isinstance(message, MessagesFetched):
            metrics.MESSAGES_FETCHED.inc(len(message.messages))
            metrics.BYTES_FETCHED.inc(sum(len(m.raw) for m in message.messages
                                          if m.raw is not None))

    def flush(self) -> None:
        """Publish what is held, and hold nothing from now on."""
        held, self._held = self._held, None
        for message in held or ():
            self.lease.check()
            self._publish(message)

    def flush_quietly(self) -> None:
        """Publish what is held on the way out of a failed attempt (the run's state then says
        what it said before events were held); a failure here must not hide the first one."""
        try:
            self.flush()
        except Exception as exc:
            log.warning("sync.held_events_dropped", error=str(exc))

    def started(self, fetcher: str) -> None:
        """The attempt begins (not a later slice of it): from here its small events are held."""
        self._held = []
        s = self.stamp
        self.publish(SyncStarted(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                 lease_token=s.lease_token, fetcher=fetcher, started_at=now()))

    def folders_listed(self, folders: list[FolderInfo], first_listing: bool,
                       selection: tuple[FolderSelection, ...] | None = None) -> None:
        s = self.stamp
        self.publish(FoldersListed(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                   lease_token=s.lease_token, folders=tuple(folders),
                                   first_listing=first_listing, selection=selection))

    def folder_failed(self, raw_name: str, events: int, error: str) -> None:
        s = self.stamp
        self.publish(FolderSynced(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                  lease_token=s.lease_token, folder=raw_name, uidvalidity=None,
                                  batches=events, messages=0, error=error))

    def finished(self, folders: int) -> None:
        s = self.stamp
        finished = SyncFinished(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                lease_token=s.lease_token, folders=folders, finished_at=now())
        completed = SyncCompleted.of(self._held, finished) if self._held else None
        if completed is not None:
            self._held = None
            self.publish(completed)
            return
        self.publish(finished)  # after what is held

    def failed(self, kind: ErrorKind, error: str) -> None:
        s = self.stamp
        self.publish(SyncFailed(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                lease_token=s.lease_token, error_kind=kind, error=error,
                                finished_at=now()))

    # --- the run's progress, for `sync --wait` (this attempt's only) ---------------------------

    def planned(self, folders: int, *, listing: bool = True) -> None:
        runs.planned(self._conn, self.stamp.run_id, self.stamp.lease_token, folders,
                     listing=listing)

    def found(self, count: int) -> None:
        if count:
            runs.found(self._conn, self.stamp.run_id, self.stamp.lease_token, count)

    def stored_flags(self, state: repository.FolderState) -> Callable[[int, int, int],
                                                                       dict[int, frozenset[str]]]:
        def read(uidvalidity: int, low: int, high: int) -> dict[int, frozenset[str]]:
            return repository.live_flags(self._conn, state, uidvalidity, low, high)
        return read


def now() -> datetime:
    return datetime.now(UTC)
