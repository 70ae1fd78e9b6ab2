"""How one mailbox is brought up to its server: which folders, which UID windows, which batches.

Plain functions over a :class:`Session` (``shared.imap.sync.SyncSession`` in production, a fake in
unit tests) and a ``publish`` callable; they hold no connection, lease or database themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol, cast

import structlog

from mailferry.budget import Budget, cost
from mailferry.domain import enabled_on_discovery
from mailferry.errors import ImapError
from mailferry.imap.manager import FolderStatus
from mailferry.imap.sync import Body, Extensions, FlagState, MessageMeta, Ranges, uid_windows
from mailferry.messages import (
    AnyMessage,
    FetchedMessage,
    FlagChange,
    FlagsChanged,
    FolderInfo,
    FolderResume,
    FolderSelection,
    FolderSynced,
    FolderType,
    MessagesExpunged,
    MessagesFetched,
)
from mailferry.repository import FolderState

log = structlog.get_logger(__name__)

META_CHUNK = 5000  # UIDs per metadata FETCH and per flag or expunge event


class Session(Protocol):
    """What planning needs of an IMAP session (``shared.imap.sync.SyncSession``)."""

    window: int

    def extensions(self) -> Extensions: ...
    def uidvalidity(self, raw_name: str) -> int | None: ...
    def select(self, folder: FolderInfo) -> FolderStatus: ...
    def iter_windows(self, low: int, status: FolderStatus) -> Iterator[tuple[int, int]]: ...
    def search(self, low: int, high: int | None, since: date | None = None) -> list[int]: ...
    def flags(self, low: int, high: int, *, changed_since: int | None,
              vanished: bool) -> tuple[list[FlagState], Ranges]: ...
    def metadata(self, uids: list[int], *,
                 message_ids: bool = False) -> dict[int, MessageMeta]: ...
    def recent_message_ids(self, folder: FolderInfo, count: int) -> set[str]: ...
    def bodies(self, uids: list[int]) -> dict[int, Body]: ...


@dataclass(frozen=True)
class Stamp:
    """What every event of one attempt carries: its run, its mailbox, its fencing token."""

    run_id: uuid.UUID
    mailbox_id: int
    lease_token: int


@dataclass(frozen=True)
class BatchLimits:
    max_bytes: int  # one MessagesFetched event
    max_count: int
    max_message: int  # a larger message is recorded without its bytes


Identity = tuple[str, int, datetime]  # Message-ID, size, INTERNALDATE


@dataclass
class FolderJob:
    """One folder's work and the adapters it reports through."""

    stamp: Stamp
    publish: Callable[[AnyMessage], None]
    stored_flags: Callable[[int, int, int], dict[int, frozenset[str]]]  # uidvalidity, low, high
    found: Callable[[int], None]  # new UIDs found (progress)
    limits: BatchLimits
    since: date  # a first sync's window: mail received since then
    force: bool = False
    # The store's messages of an older UIDVALIDITY of this folder, by identity: (uidvalidity,
    # Message-IDs) -> {identity: hex SHA-256}. What spares re-downloading them after a reset.
    stored_by_identity: Callable[[int, list[str]], dict[Identity, str]] = (
        lambda _uidvalidity, _ids: {})
    # The mailbox's download budget (shared/budget.py); without a limit, nothing changes. Each
    # slice opens it again from the stored usage, so a resumed folder sees what earlier slices spent.
    budget: Budget = field(default_factory=Budget)
    # True when the slice is over: the folder stops at the next batch boundary of its new mail
    # (``FolderPaused``), to be resumed by a ContinueSync command.
    pause: Callable[[], bool] = lambda: False


@dataclass
class FolderTotals:
    messages: int = 0
    bytes: int = 0
    flag_changes: int = 0
    expunged: int = 0
    events: int = 0
    recognised: int = 0  # stored messages found again under new UIDs: not downloaded
    budget_exhausted: bool = False  # the download budget stopped the folder; the rest waits
    backfill_below: int | None = None  # what FolderSynced says is still to fetch


RENAME_SAMPLE = 20  # the vanished folder's newest stored Message-IDs a rename must hold


def detect_renames(session: Session, folders: list[FolderInfo], states: dict[str, FolderState],
                   stored_sample: Callable[[FolderState], list[str]] = lambda _s: [],
                   ) -> tuple[list[FolderInfo], set[str]]:
    """IMAP has no rename notification. When known folders vanished and new ones appeared:

    - a renamed folder keeps its UIDVALIDITY on most servers (RFC 3501 6.3.5), so the new ones'
      UIDVALIDITY (one STATUS each) tells renames from deletions;
    - some servers (Courier) give it a new one: a vanished *enabled* folder is then recognised
      by its content, when exactly one new folder holds all of its newest stored Message-IDs
      among its own newest messages (``renamed_from``). Where that cannot be decided (no
      Message-IDs, no candidate, several), nothing is renamed or enabled by guess.

    Returns the folders, with ``renamed_from`` (and UIDVALIDITY, where it was asked) set on the
    renamed ones, and the raw names that are renames of known folders. A renamed folder is
    synced in the same run, from its old name's state (:func:`state_of`)."""
    listed = {f.raw_name for f in folders}
    vanished = [s for name, s in states.items() if name not in listed]
    if not vanished:
        return folders, set()
    gone = {s.uidvalidity: s.raw_name for s in vanished if s.uidvalidity}
    out = []
    for f in folders:
        if f.raw_name not in states and f.selectable:
            uidvalidity = session.uidvalidity(f.raw_name)
            f = f.model_copy(update={"uidvalidity": uidvalidity,
                                     "renamed_from": gone.get(uidvalidity or 0)})
        out.append(f)
    renamed = {f.raw_name for f in out if f.renamed_from is not None}
    candidates = [f for f in out if f.raw_name not in states and f.selectable
                  and f.raw_name not in renamed]
    by_uidvalidity = {s.uidvalidity for s in vanished} & {f.uidvalidity for f in out}
    unmatched = [s for s in vanished if s.sync_enabled and s.uidvalidity not in by_uidvalidity]
    if unmatched and candidates:
        contents = {f.raw_name: session.recent_message_ids(f, RENAME_SAMPLE * 5)
                    for f in candidates}
        for state in unmatched:
            sample = set(stored_sample(state)[:RENAME_SAMPLE])
            holders = [name for name, ids in contents.items() if sample and sample <= ids]
            if len(holders) != 1 or holders[0] in renamed:
                log.info("folders.rename_undecided", vanished=state.raw_name,
                         candidates=len(holders), sample=len(sample))
                continue
            renamed.add(holders[0])
            out = [f.model_copy(update={"renamed_from": state.raw_name})
                   if f.raw_name == holders[0] else f for f in out]
    if renamed:
        log.info("folders.renamed", new_names=sorted(renamed))
    return out, renamed


def state_of(folder: FolderInfo, states: dict[str, FolderState]) -> FolderState | None:
    """The stored state of a listed folder: under its name, or, renamed in this run, under the
    name it had (its row, checkpoint and settings go with it)."""
    state = states.get(folder.raw_name)
    if state is None and folder.renamed_from is not None:
        state = states.get(folder.renamed_from)
    return state


def folders_to_sync(folders: Sequence[FolderInfo], states: dict[str, FolderState],
                    initial_folders: Sequence[str] | None,
                    selection: Sequence[FolderSelection] | None = None,
                    only: Sequence[str] | None = None) -> list[FolderInfo]:
    """The enabled, selectable folders: a renamed one as its old name was (synced under its new
    name in this run), a folder new to the store as the mailbox's (resolved) selection says.
    ``only`` (a push-triggered command's ``folders``, raw names, when :func:`stored_folders`
    could not name them without a listing) narrows them to those that changed; it never enables
    a folder, and the listing itself stays complete, so the persister's rules for vanished
    folders see every folder the server has."""
    wanted = None if only is None else {_inbox_upper(name) for name in only}
    return [
        f for f in folders
        if f.selectable and (wanted is None or _inbox_upper(f.raw_name) in wanted)
        and (state.sync_enabled if (state := state_of(f, states)) is not None
             else enabled_on_discovery(f, initial_folders, first_listing=not states,
                                       selection=selection))
    ]


def stored_folders(states: dict[str, FolderState],
                   only: Sequence[str]) -> list[FolderInfo] | None:
    """A push run's folders (``only``, raw names) as the last listing stored them, when every one
    is known, enabled, selectable and not gone: the run then syncs them without listing the
    whole mailbox (one LIST and one FoldersListed less on the way from a new message to the
    store). None when any is not (a folder the store has not seen, or disabled since): the run
    lists, as a scheduled one does. Renamed and deleted folders are the listing's business,
    so they wait for the next run that lists (the schedule, or any non-push run)."""
    by_name = {_inbox_upper(name): state for name, state in states.items()}
    out = []
    for name in dict.fromkeys(_inbox_upper(n) for n in only):
        state = by_name.get(name)
        if state is None or not (state.sync_enabled and state.selectable and not state.gone):
            return None
        out.append(FolderInfo(name=state.name or state.raw_name, raw_name=state.raw_name,
                              delimiter=state.delimiter, flags=state.flags,
                              type=cast(FolderType, state.type), selectable=True))
    return out or None


def _inbox_upper(raw_name: str) -> str:
    """INBOX is case-insensitive (RFC 3501 section 5.1): "Inbox" and "INBOX" are one folder."""
    return "INBOX" if raw_name.upper() == "INBOX" else raw_name


def batches(metas: Sequence[MessageMeta], max_bytes: int,
            max_count: int) -> Iterator[list[MessageMeta]]:
    """Groups bounded by declared bytes and by count (a message larger than ``max_bytes`` alone).
    Declared sizes only shape batches: what is held is bounded by the wire's own limits."""
    group: list[MessageMeta] = []
    size = 0
    for meta in metas:
        if group and (size + meta.size > max_bytes or len(group) >= max_count):
            yield group
            group, size = [], 0
        group.append(meta)
        size += meta.size
    if group:
        yield group


def fetched(metas: Sequence[MessageMeta], bodies: dict[int, Body],
            max_message: int) -> list[FetchedMessage]:
    """The messages of one batch; one expunged between the two FETCHes is left out, and one
    whose bytes exceeded the limit is recorded without them (``skipped_reason``)."""
    out: list[FetchedMessage] = []
    for meta in metas:
        body = bodies.get(meta.uid)
        if body is None:
            continue
        if body.raw is None or body.size > max_message:
            out.append(FetchedMessage(uid=meta.uid, flags=meta.flags,
                                      internal_date=meta.internal_date, size=body.size, raw=None,
                                      skipped_reason=f"larger than {max_message} bytes"))
            continue
        out.append(FetchedMessage(uid=meta.uid, flags=meta.flags, internal_date=meta.internal_date,
                                  size=len(body.raw), raw=body.raw))
    return out


class FolderPaused(Exception):
    """The slice ended inside this folder; ``resume`` says where the next one goes on."""

    def __init__(self, resume: FolderResume) -> None:
        super().__init__(f"paused at uid {resume.next_uid} of {resume.folder}")
        self.resume = resume


class FolderFailed(ImapError):
    """An IMAP error after some events of the folder were already published."""

    def __init__(self, cause: ImapError, events: int) -> None:
        super().__init__(str(cause))
        self.kind = cause.kind
        self.cause = cause
        self.events = events


def sync_folder(session: Session, folder: FolderInfo, state: FolderState | None,
                job: FolderJob, resume: FolderResume | None = None) -> FolderTotals:
    """Bring one folder's store up to the server: changes to known messages first (flags,
    expunges), then new UIDs, window by window. Every event is numbered; FolderSynced says how
    many there were. Raises ``FolderFailed`` when the server fails mid-folder, and
    ``FolderPaused`` when ``job.pause()`` says the slice is over (checked after each batch of
    new mail, so every slice publishes at least one). ``resume`` goes on where a paused slice
    stopped: its known-message pass is done, its numbering continues."""
    totals = FolderTotals()
    try:
        status = session.select(folder)  # a folder the server will not open fails alone
    except ImapError as exc:
        raise FolderFailed(exc, resume.events if resume else 0) from exc
    if resume is not None:
        # The numbering goes on either way: batches published before count in FolderSynced.
        totals.events, totals.messages = resume.events, resume.messages
        if resume.uidvalidity != status.uidvalidity:
            resume = None  # reset between two slices: the folder starts over

    def publish(message: FlagsChanged | MessagesExpunged | MessagesFetched) -> None:
        job.publish(message)
        totals.events += 1

    same_generation = state is not None and state.uidvalidity == status.uidvalidity
    # A new UIDVALIDITY for a folder the store holds mail of (a server reset, or a rename that
    # changed it): its messages come back under new UIDs; stored ones are recognised, not fetched.
    reset = (state.uidvalidity if state is not None and not same_generation and state.last_uid
             and state.uidvalidity is not None else None)
    above = state.last_uid if (state is not None and same_generation and not job.force) else 0
    # A first sync that the download budget cut earlier: UIDs below this still to fetch.
    pending = state.backfill_below if (state is not None and same_generation and above) else None
    s = job.stamp
    highest_found = 0
    stopped_at: int | None = None  # new mail above the checkpoint stopped by the budget here
    start_at = above + 1
    # A first sync under a budget goes newest first: what fits today is the recent mail, and the
    # older mail follows over the next runs (``backfill_below``).
    newest_first = job.budget.limit is not None and not above
    below: int | None = None  # a descending pass's position: UIDs below it are still to go
    top: int | None = None  # newest first: the highest UID the descending pass covers
    if resume is not None:
        above, start_at, highest_found = resume.above, resume.next_uid, resume.next_uid - 1
        newest_first, below = resume.newest_first, resume.below
        if newest_first:
            top = resume.next_uid - 1
    progressed = False  # a slice pauses only after some progress, and before more work

    def pause_before(uid: int, descending: bool = False) -> None:
        """Before the work at ``uid`` (ascending: it and above; descending: it and below)."""
        if progressed and job.pause():
            raise FolderPaused(FolderResume(
                folder=folder.raw_name, uidvalidity=status.uidvalidity,
                next_uid=(top + 1) if newest_first and top is not None else
                (uid if not descending else max(above, highest_found,
                                                (status.uidnext or 1) - 1) + 1),
                above=above, events=totals.events, messages=totals.messages,
                newest_first=newest_first, below=uid + 1 if descending else below))

    def progress(uid: int | None) -> None:
        nonlocal progressed, highest_found
        progressed = True
        if uid is not None and not newest_first:
            highest_found = max(highest_found, uid)

    def descend(high_bound: int | None) -> int | None:
        """The first-sync windows below ``high_bound`` (None: all), newest first; returns the
        first UID the budget did not allow, or None when all went."""
        nonlocal below, top
        for low, high in reversed(list(session.iter_windows(1, status))):
            if high_bound is not None:
                high = min(high, high_bound - 1)
            if high < low:
                continue
            pause_before(high, descending=True)
            uids = session.search(low, high, job.since)
            job.found(len(uids))
            if newest_first:
                top = max([top or 0, *uids])
            stop = _fetch(session, folder, status, uids[::-1], reset, job, totals, publish,
                          lambda uid: pause_before(uid, descending=True), progress)
            if stop is not None:
                return stop
            below = low
            progress(None)
        return None

    try:
        if state is not None and same_generation and state.last_uid and resume is None:
            _known_messages(session, folder, state, status, job, totals, publish)
        if newest_first:
            if top is None:  # the first slice: the top is UIDNEXT's, or what the SEARCH finds
                top = (status.uidnext or 1) - 1
            stop = descend(below)
            totals.backfill_below = stop + 1 if stop is not None else None
            highest_found = max(highest_found, top)
        else:
            if above and status.uidnext is not None and status.uidnext <= start_at:
                windows = []  # UIDNEXT says nothing arrived: no SEARCH
            else:
                windows = list(session.iter_windows(start_at, status))
            for low, high in windows:
                pause_before(low)
                # Everything above the checkpoint, whatever its date; on a first sync, the window.
                uids = session.search(low, high, None if above else job.since)
                job.found(len(uids))
                stop = _fetch(session, folder, status, uids, reset, job, totals, publish,
                              pause_before, progress)
                if stop is not None:
                    stopped_at = stop
                    break
                highest_found = max([highest_found, *uids])
                progress(None)
            if pending is not None and stopped_at is None and not totals.budget_exhausted:
                # Resume the cut first sync, newest first, below where it stopped.
                stop = descend(below if below is not None else pending)
                totals.backfill_below = stop + 1 if stop is not None else None
            elif pending is not None:
                totals.backfill_below = below if below is not None else pending
    except ImapError as exc:
        raise FolderFailed(exc, totals.events) from exc
    last_uid = (stopped_at - 1 if stopped_at is not None
                else max(above, highest_found,
                         (status.uidnext or 1) - 1 if not newest_first else 0))
    job.publish(FolderSynced(run_id=s.run_id, mailbox_id=s.mailbox_id, lease_token=s.lease_token,
                             folder=folder.raw_name, uidvalidity=status.uidvalidity,
                             uidnext=status.uidnext if stopped_at is None else None,
                             highest_modseq=status.highest_modseq if stopped_at is None else None,
                             last_uid=last_uid, batches=totals.events, messages=totals.messages,
                             backfill_below=totals.backfill_below))
    return totals


def _fetch(session: Session, folder: FolderInfo, status: FolderStatus, uids: list[int],
           reset: int | None, job: FolderJob, totals: FolderTotals,
           publish: Callable[[MessagesFetched], None],
           pause_before: Callable[[int], None] = lambda _uid: None,
           progress: Callable[[int | None], None] = lambda _uid: None) -> int | None:
    """Fetch and publish ``uids`` in the order given, in bounded batches; returns the first UID
    the download budget did not allow (it and those after it are left), or None when all went.
    ``pause_before(uid)`` may end the slice (``FolderPaused``) before the work at ``uid``;
    ``progress(uid)`` is told of each batch published, by its last UID."""
    s = job.stamp
    budget = job.budget
    for start in range(0, len(uids), META_CHUNK):
        chunk = uids[start:start + META_CHUNK]
        pause_before(chunk[0])
        metas = session.metadata(chunk, message_ids=reset is not None)
        ordered = [metas[u] for u in chunk if u in metas]
        known = _known(ordered, reset, job)
        for group in batches([m for m in ordered if m.uid not in known],
                             job.limits.max_bytes, job.limits.max_count):
            if not known:  # recognised ones are published after the chunk's batches
                pause_before(group[0].uid)
            while group:
                take, beyond = _affordable(group, budget)
                if not take and not beyond:
                    totals.budget_exhausted = True
                    log.info("folder.budget_exhausted", used=budget.used, limit=budget.limit,
                             next_uid=group[0].uid)
                    return group[0].uid
                messages = fetched(take, session.bodies([m.uid for m in take]),
                                   job.limits.max_message)
                declared = {m.uid: m.size for m in take}
                budget.spend(sum(cost(declared[m.uid], m.size) for m in messages))
                totals.bytes += sum(m.size for m in messages)
                messages += [FetchedMessage(uid=m.uid, flags=m.flags,
                                            internal_date=m.internal_date, size=m.size, raw=None,
                                            skipped_reason="larger than the download budget "
                                                           f"({budget.limit} bytes)")
                             for m in beyond]
                publish(MessagesFetched(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                        lease_token=s.lease_token, folder=folder.raw_name,
                                        uidvalidity=status.uidvalidity,
                                        batch_no=totals.events, messages=tuple(messages)))
                totals.messages += len(messages)
                done = len(take) + len(beyond)
                progress(group[done - 1].uid)
                group = group[done:]
        if known:
            recognised = tuple(
                FetchedMessage(uid=m.uid, flags=m.flags, internal_date=m.internal_date,
                               size=m.size, raw=None, sha256=known[m.uid])
                for m in ordered if m.uid in known)
            publish(MessagesFetched(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                    lease_token=s.lease_token, folder=folder.raw_name,
                                    uidvalidity=status.uidvalidity,
                                    batch_no=totals.events, messages=recognised))
            totals.messages += len(recognised)
            totals.recognised += len(recognised)
        progress(chunk[-1])
    return None


def _affordable(group: list[MessageMeta],
                budget: Budget) -> tuple[list[MessageMeta], list[MessageMeta]]:
    """The head of ``group`` whose declared cost fits the budget, and (when nothing fits) a
    first message that no budget ever could: it is recorded without its bytes rather than
    stalling the folder for good."""
    if budget.limit is None:
        return group, []
    take: list[MessageMeta] = []
    planned = 0
    for meta in group:
        if not budget.allows(planned + cost(meta.size)):
            break
        take.append(meta)
        planned += cost(meta.size)
    if not take and cost(group[0].size) > budget.limit:
        return [], [group[0]]
    return take, []


def _known(metas: Sequence[MessageMeta], reset: int | None, job: FolderJob) -> dict[int, str]:
    """UID -> hex SHA-256 of the metas whose (Message-ID, size, INTERNALDATE) the store holds
    under the folder's previous UIDVALIDITY ``reset``."""
    if reset is None:
        return {}
    ids = sorted({m.message_id for m in metas if m.message_id})
    stored = job.stored_by_identity(reset, ids) if ids else {}
    return {m.uid: stored[key] for m in metas
            if m.message_id and m.internal_date is not None
            and (key := (m.message_id, m.size, m.internal_date)) in stored}


def _known_messages(session: Session, folder: FolderInfo, state: FolderState,
                    status: FolderStatus, job: FolderJob, totals: FolderTotals,
                    publish: Callable[[FlagsChanged | MessagesExpunged], None]) -> None:
    """Flag changes and expunges among the UIDs already synced (1..last_uid), window by window.

    With CONDSTORE, an unchanged HIGHESTMODSEQ proves nothing changed (expunges raise it too,
    RFC 7162 section 3.1.2): no command is sent. Otherwise flags come from CHANGEDSINCE, or from a
    full FLAGS pass without CONDSTORE; expunges from VANISHED with QRESYNC, otherwise from
    comparing the server's UIDs with ours.
    """
    extensions = session.extensions()
    incremental = extensions.condstore and state.highest_modseq is not None
    if incremental and status.highest_modseq == state.highest_modseq:
        return
    use_vanished = incremental and extensions.qresync
    s = job.stamp
    exists = max(status.exists, 1)
    for low, high in uid_windows(1, state.last_uid, exists, session.window):
        current, vanished = session.flags(
            low, high, changed_since=state.highest_modseq if incremental else None,
            vanished=use_vanished)
        stored = job.stored_flags(status.uidvalidity, low, high)
        # Only what differs from the store travels (a full pass without CONDSTORE sees every UID).
        changes = [FlagChange(uid=f.uid, flags=f.flags, modseq=f.modseq) for f in current
                   if f.uid in stored and frozenset(f.flags) != stored[f.uid]]
        for start in range(0, len(changes), META_CHUNK):
            publish(FlagsChanged(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                 lease_token=s.lease_token, folder=folder.raw_name,
                                 uidvalidity=status.uidvalidity, batch_no=totals.events,
                                 changes=tuple(changes[start:start + META_CHUNK])))
        if use_vanished:
            gone = sorted(uid for uid in stored if uid in vanished)
        else:
            present = set(session.search(low, high))
            gone = sorted(uid for uid in stored if uid not in present)
        for start in range(0, len(gone), META_CHUNK):
            publish(MessagesExpunged(run_id=s.run_id, mailbox_id=s.mailbox_id,
                                     lease_token=s.lease_token, folder=folder.raw_name,
                                     uidvalidity=status.uidvalidity, batch_no=totals.events,
                                     uids=tuple(gone[start:start + META_CHUNK])))
        totals.flag_changes += len(changes)
        totals.expunged += len(gone)
