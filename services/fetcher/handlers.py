"""The fetcher's work: one SyncMailbox command -> folder and message events on the broker.

The entry point wires an :class:`Attempt` (lease, stamped events, run progress) to the planning
functions (``services.fetcher.planning``) over an IMAP ``SyncSession``. The command is acked by the
worker only after this returns, i.e. after every event of the attempt was confirmed by the broker;
a crash anywhere means the command comes back and another attempt (with a newer fencing token)
starts over, which the persister's idempotence absorbs.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import structlog

from mailferry import budget, metrics, oauth, repository, runs, slots
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.db import Connection
from mailferry.domain import first_sync_since, resolve_selection
from mailferry.errors import (
    ConfigError,
    ErrorKind,
    ImapAuthError,
    ImapConnectionError,
    ImapError,
    ImapThrottled,
    LeaseHeld,
    NoConnectionSlot,
    TransientError,
)
from mailferry.imap import (
    ImapConnectorFactory,
    OAuth2Auth,
    SyncSession,
    connector_factory,
    folder_type,
)
from mailferry.messages import (
    AnyMessage,
    ContinueSync,
    CredentialsInvalid,
    CredentialsRestored,
    FolderInfo,
    FolderResume,
    SyncFolders,
    SyncMailbox,
)
from mailferry.services.fetcher import lease as leases
from mailferry.services.fetcher import planning
from mailferry.services.fetcher.attempt import Attempt, now

log = structlog.get_logger(__name__)


@dataclass
class FetcherDeps:
    settings: Settings
    connection: Callable[[], Connection]  # autocommit; reads, the run row and the lease
    publish: Callable[[AnyMessage], None]
    passwords: PasswordBox
    fetcher_id: str
    connectors: ImapConnectorFactory = connector_factory  # IMAP sessions, per mailbox config
    today: Callable[[], date] = lambda: datetime.now(UTC).date()
    # The connection budgets' slots of this process (made from the settings when not given).
    slots: slots.ConnectionSlots | None = None

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = slots.ConnectionSlots(self.settings, self.fetcher_id,
                                               self.settings.lease_seconds)


Command = SyncMailbox | SyncFolders | ContinueSync


def sync_mailbox(cmd: Command, deps: FetcherDeps) -> None:
    """One attempt at one run, or one slice of it. A transient fault (refused, timed out,
    [UNAVAILABLE], or the connection lost in the middle of a folder) is recorded on the run and
    raised, so the worker retries it after a delay; when no retry is left,
    :func:`command_given_up` closes the run. A permanent one (refused credentials, settings that
    cannot work) is the run's outcome. The attempt has a wall-clock deadline: past it, every
    read fails and the lease lapses.

    After ``MAILFERRY_FETCHER_SLICE_SECONDS`` the sync stops at the next batch or folder
    boundary, hands its lease over and publishes a :class:`ContinueSync` (with the same fencing
    token and the rest of the plan); the command in hand is then acked, so no delivery stays
    unacknowledged anywhere near RabbitMQ's ``consumer_timeout``.

    The IMAP connection holds a slot of the account's connection budget (``shared/slots.py``);
    when none is free, the run stays queued and the command comes back later
    (``runs.waiting``, ``NoConnectionSlot``): never a failure, never a dead letter."""
    structlog.contextvars.bind_contextvars(mailbox_id=cmd.mailbox_id, run_id=str(cmd.run_id))
    started = time.monotonic()
    conn = deps.connection()
    mailbox = repository.get_mailbox(conn, cmd.mailbox_id)
    if mailbox is None:
        log.info("sync.skipped", reason="mailbox no longer exists")
        return
    run = runs.get(conn, cmd.run_id)
    if run is None and not isinstance(cmd, ContinueSync):
        # A command published by hand straight to the broker has no run yet: register it,
        # unless the mailbox already has a run queued or running (then it is redundant).
        runs.request(conn, mailbox.id, run_id=cmd.run_id, force=cmd.force,
                     requested_by=cmd.requested_by,
                     kind=runs.RunKind.FOLDERS if isinstance(cmd, SyncFolders)
                     else runs.RunKind.MAILBOX)
        run = runs.get(conn, cmd.run_id)
    if run is None:
        log.info("sync.skipped", reason="another run of this mailbox is queued or running")
        return
    if not run.active:
        log.info("sync.skipped", reason=f"run already {run.status}")
        return

    s = deps.settings
    deadline = started + s.sync_deadline
    slice_end = started + s.fetcher_slice_seconds
    token: int | None = None
    if isinstance(cmd, ContinueSync):
        structlog.contextvars.bind_contextvars(slice=cmd.slice)
        if leases.resume(conn, mailbox.id, deps.fetcher_id, s.lease_seconds, cmd.lease_token):
            token = cmd.lease_token
        else:  # a newer attempt, or a slice frozen past its lease: start over, fenced
            log.info("sync.restarted", reason="the lease handed over moved on")
            cmd = SyncMailbox(run_id=cmd.run_id, mailbox_id=cmd.mailbox_id, force=cmd.force,
                              requested_by=cmd.requested_by)
    try:
        with leases.held(s.database_url, conn, mailbox.id, deps.fetcher_id,
                         s.lease_seconds, deadline, token=token) as lease:
            # A slice that finds no slot hands its lease over again, for itself once back.
            lease.handing_over = token is not None
            assert deps.slots is not None
            # Released after the connection logged out; nothing is published before it.
            with deps.slots.held(mailbox.id, mailbox.host, mailbox.username,
                                 slots.Purpose.SYNC):
                lease.handing_over = False
                outcome = _attempt(cmd, deps, conn, mailbox, lease, token, started, deadline,
                                   slice_end)
    except NoConnectionSlot as exc:
        # Every slot of the account's (or host's) budget is taken: the run stays queued and
        # the command comes back later (no retry spent, never a dead letter).
        exc.retry_after = runs.waiting(conn, cmd.run_id, mailbox.id, str(exc),
                                       base=s.retry_delays[0], cap=max(s.retry_delays))
        metrics.SYNCS.labels("waiting", ErrorKind.THROTTLED).inc()
        log.info("sync.waiting_for_connection", reason=str(exc),
                 seconds=round(exc.retry_after, 1))
        raise
    if outcome is None:
        return
    seconds = round(time.monotonic() - started, 3)
    metrics.SYNC_SECONDS.observe(time.monotonic() - started)
    if isinstance(outcome, ContinueSync):
        if not lease.handing_over:  # lost meanwhile: the newer attempt owns the run now
            return
        deps.publish(outcome)
        metrics.SYNCS.labels("sliced", "").inc()
        log.info("sync.sliced", seconds=seconds, next_slice=outcome.slice,
                 folders_left=len(outcome.folders), folders=outcome.folders_done,
                 messages=outcome.messages)
        return
    metrics.SYNCS.labels("done", ErrorKind.FOLDER if outcome.failed_folders else "").inc()
    log.info("sync.fetched", seconds=seconds, folders=outcome.folders,
             failed_folders=outcome.failed_folders, messages=outcome.messages,
             bytes=outcome.bytes)


def _attempt(cmd: Command, deps: FetcherDeps, conn: Connection, mailbox: repository.Mailbox,
             lease: leases.Lease, token: int | None, started: float, deadline: float,
             slice_end: float) -> Totals | ContinueSync | None:
    """The attempt under its lease and connection slot: its outcome, or None when it ended
    here (failed, throttled; a transient fault is raised for a retry)."""
    s = deps.settings
    attempt = Attempt(cmd.run_id, mailbox.id, lease, conn, deps.publish)
    if token is None:
        attempt.started(deps.fetcher_id)
    try:
        config = mailbox.imap_config(deps.passwords, timeout=s.imap_timeout,
                                     ca_file=s.imap_ca_file,
                                     allow_private_networks=s.allow_private_networks,
                                     limits=s.imap_limits())
        # OAuth2: the access token comes from the token row (refreshed under its lock).
        auth = oauth.authenticator(mailbox, conn, deps.passwords, timeout=s.imap_timeout)
        with (deps.connectors.create_imap_connector(config, auth) as connector,
              metrics.imap_connection()):
            connector.set_deadline(deadline)
            connector.connect()  # a refused login fails here, before anything is published
            if token is None and (mailbox.credentials_invalid_at is not None
                                  or mailbox.last_error_kind == "auth"):
                deps.publish(CredentialsRestored(mailbox_id=mailbox.id, restored_at=now()))
            outcome = _sync_folders(cmd, deps, attempt, SyncSession(connector), mailbox,
                                    lambda: time.monotonic() > slice_end, auth)
    except (ImapError, ConfigError) as exc:
        attempt.flush_quietly()
        kind = exc.kind if isinstance(exc, ImapError) else ErrorKind.CONFIG
        metrics.SYNC_SECONDS.observe(time.monotonic() - started)
        if isinstance(exc, ImapThrottled):
            # The provider limits the account: back off (the scheduler waits), never a
            # retry soon, never "credentials invalid", never a dead letter.
            until = runs.throttled(conn, cmd.run_id, mailbox.id, str(exc),
                                   base=s.throttle_backoff, cap=s.throttle_backoff_max,
                                   suggested=exc.retry_after)
            metrics.SYNCS.labels("throttled", kind).inc()
            log.warning("sync.throttled", error=str(exc), until=until.isoformat())
            return None
        if isinstance(exc, TransientError):
            runs.retrying(conn, cmd.run_id, kind, str(exc))
            metrics.SYNCS.labels("retrying", kind).inc()
            log.warning("sync.retrying", error_kind=kind, error=str(exc))
            raise
        attempt.failed(kind, str(exc))
        if isinstance(exc, ImapAuthError):
            # Every refusal is told; the notifier tells people once per transition.
            deps.publish(CredentialsInvalid(mailbox_id=mailbox.id, run_id=cmd.run_id,
                                            error=str(exc), detected_at=now()))
        metrics.SYNCS.labels("failed", kind).inc()
        log.warning("sync.failed", error_kind=kind, error=str(exc),
                    seconds=round(time.monotonic() - started, 3))
        return None
    except Exception:
        attempt.flush_quietly()
        raise
    if isinstance(outcome, ContinueSync):
        attempt.flush()  # the next slice's events follow these
        lease.handing_over = True
    else:
        attempt.finished(outcome.folders)
    return outcome


def command_given_up(cmd: AnyMessage, exc: BaseException, deps: FetcherDeps) -> None:
    """A command that will not be tried again closes its run as failed, with the last error (an
    IMAP fault keeps its kind: the mailbox shows "timeout", not "internal"), so nobody waits on
    it (``sync --wait``) and the scheduler queues the mailbox again at the next interval."""
    if not isinstance(cmd, SyncMailbox | SyncFolders | ContinueSync):
        return
    if isinstance(exc, LeaseHeld):
        # A duplicate delivery (a redelivery, a second command for the same run) that kept
        # meeting a live attempt: that attempt owns the run and closes it; failing the run here
        # would end a sync that is still going. (A dead holder's lease expires, and its run
        # with the attempt's deadline or MAILFERRY_RUN_TIMEOUT.)
        log.info("sync.duplicate_dropped", run_id=str(cmd.run_id), mailbox_id=cmd.mailbox_id)
        return
    kind = exc.kind if isinstance(exc, ImapError) else ErrorKind.INTERNAL
    metrics.SYNCS.labels("failed", kind).inc()
    runs.fail(deps.connection(), cmd.run_id, cmd.mailbox_id, kind,
              f"gave up: {type(exc).__name__}: {exc}", now())


HANDLERS: dict[type, Callable[..., None]] = {
    SyncMailbox: sync_mailbox,
    SyncFolders: sync_mailbox,
    ContinueSync: sync_mailbox,
}


@dataclass
class Totals:
    """What one attempt published, over all its slices so far."""

    folders: int = 0  # FolderSynced events
    failed_folders: int = 0
    messages: int = 0
    bytes: int = 0  # this slice only


def _sync_folders(cmd: Command, deps: FetcherDeps, attempt: Attempt, session: SyncSession,
                  mailbox: repository.Mailbox, pause: Callable[[], bool],
                  auth: OAuth2Auth | None = None) -> Totals | ContinueSync:
    """The attempt's folders, or the next slice's command when ``pause`` ended this one."""
    conn = deps.connection()
    session.extensions()
    states = repository.folder_states(conn, mailbox.id)
    s = deps.settings
    # Opened by every slice: what earlier slices spent is in the stored usage.
    allowance = budget.open_budget(conn, mailbox.id, mailbox.host, s)
    resume: FolderResume | None = None
    if isinstance(cmd, ContinueSync):
        # The plan was made by the attempt's first slice: no second listing, no second
        # FoldersListed; the folders' checkpoints have not moved (only this attempt moves them).
        to_sync = list(cmd.folders)
        resume, since = cmd.resume, cmd.since
        totals = Totals(folders=cmd.folders_done, failed_folders=cmd.failed_folders,
                        messages=cmd.messages)
    elif (isinstance(cmd, SyncMailbox) and cmd.folders is not None
          and (known := planning.stored_folders(states, cmd.folders)) is not None):
        # Push: the folders that changed, as stored; no listing (see planning.stored_folders).
        totals = Totals()
        since = first_sync_since(deps.today(), mailbox.first_sync_days or s.first_sync_days)
        to_sync = known
        attempt.planned(len(to_sync), listing=False)
    else:
        folders, _ = planning.detect_renames(
            session, session.list_folders(), states,
            lambda state: repository.newest_message_ids(conn, state, planning.RENAME_SAMPLE))
        selection = None
        if mailbox.initial_folders is not None:
            selection = resolve_selection(
                folders, mailbox.initial_folders, session.personal_namespace(),
                {n.casefold(): folder_type(n, None, ()) for n in mailbox.initial_folders})
            unmatched = [sel.name for sel in selection if sel.raw_name is None]
            if unmatched:
                log.warning("folders.selection_unmatched", names=unmatched)
        attempt.folders_listed(folders, first_listing=not states, selection=selection)
        totals = Totals()
        if isinstance(cmd, SyncFolders):
            return totals
        since = first_sync_since(deps.today(), mailbox.first_sync_days or s.first_sync_days)
        to_sync = planning.folders_to_sync(folders, states, mailbox.initial_folders,
                                           selection, only=cmd.folders)
        attempt.planned(len(to_sync))

    def next_slice(rest: list[FolderInfo], where: FolderResume | None) -> ContinueSync:
        return ContinueSync(
            run_id=cmd.run_id, mailbox_id=cmd.mailbox_id,
            lease_token=attempt.stamp.lease_token,
            slice=cmd.slice + 1 if isinstance(cmd, ContinueSync) else 2,
            force=cmd.force, requested_by=cmd.requested_by, since=since, folders=tuple(rest),
            resume=where, folders_done=totals.folders, failed_folders=totals.failed_folders,
            messages=totals.messages)

    for index, folder in enumerate(to_sync):
        if index > 0 and pause():
            return next_slice(to_sync[index:], None)
        attempt.lease.check()
        structlog.contextvars.bind_contextvars(folder=folder.name)
        state = planning.state_of(folder, states)
        job = planning.FolderJob(
            stamp=attempt.stamp, publish=attempt.publish,
            stored_flags=attempt.stored_flags(state) if state else lambda *_: {},
            found=attempt.found,
            limits=planning.BatchLimits(s.batch_max_bytes, s.batch_max_messages,
                                        s.max_message_bytes),
            since=since, force=cmd.force,
            stored_by_identity=functools.partial(repository.stored_by_identity, conn, state)
            if state else lambda *_: {},
            budget=allowance, pause=pause)
        here = resume if index == 0 and resume and resume.folder == folder.raw_name else None
        try:
            done = _sync_folder(session, folder, state, job, here, auth)
            totals.folders += 1
            totals.messages += done.messages - (here.messages if here else 0)
            totals.bytes += done.bytes
            if done.budget_exhausted:
                metrics.BUDGET_STOPS.inc()
            log.info("folder.fetched", messages=done.messages, bytes=done.bytes,
                     flag_changes=done.flag_changes, expunged=done.expunged, events=done.events,
                     recognised=done.recognised, backfill_below=done.backfill_below)
        except planning.FolderPaused as paused:
            totals.messages += paused.resume.messages - (here.messages if here else 0)
            return next_slice(to_sync[index:], paused.resume)
        except planning.FolderFailed as failure:
            exc = failure.cause
            connection_gone = not session.connector.usable or isinstance(exc, ImapConnectionError)
            if isinstance(exc, ImapThrottled) or (connection_gone
                                                  and isinstance(exc, TransientError)):
                # The connection dropped or timed out mid-folder: a transient fault, so the
                # attempt is retried after a delay like one before any folder work, rather than
                # the run failed. A provider's limit stops the whole mailbox (backed off).
                raise exc from failure
            # One bad folder never stalls the mailbox (DESIGN invariant 5): close it with its
            # error (its checkpoint stays) and go on, unless the connection itself is gone:
            # then the folders not reached are closed with that error too.
            totals.folders += 1
            totals.failed_folders += 1
            attempt.folder_failed(folder.raw_name, failure.events, str(exc))
            log.warning("folder.failed", error=str(exc), error_kind=exc.kind)
            if connection_gone:
                for rest in to_sync[index + 1:]:
                    attempt.folder_failed(rest.raw_name, 0, f"not reached: {exc}")
                    totals.folders += 1
                break
        finally:
            structlog.contextvars.unbind_contextvars("folder")
    return totals


#: New logins after "token expired" within one folder, before the failure stands.
REAUTHENTICATIONS = 2


def _sync_folder(session: SyncSession, folder: FolderInfo, state: repository.FolderState | None,
                 job: planning.FolderJob, here: FolderResume | None,
                 auth: OAuth2Auth | None) -> planning.FolderTotals:
    """One folder; for an OAuth2 mailbox, a server that ends the session because the access
    token expired (a BYE mid-sync) gets a refreshed token and a new login, and the folder
    goes on from its stored checkpoint (what was already published is harmless to repeat)."""
    for tries in range(REAUTHENTICATIONS + 1):
        try:
            return planning.sync_folder(session, folder, state, job, here)
        except planning.FolderFailed as failure:
            if auth is None or tries == REAUTHENTICATIONS or not oauth.token_expired(
                    failure.cause):
                raise
            log.info("sync.reauthenticating", reason=str(failure.cause))
            auth.token_expired()
            session.reconnect()
    raise AssertionError("unreachable")
