"""The fetcher's planning, over a fake session (no I/O): folders, UID windows, batches, renames."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import pytest

from mailferry.errors import ImapConnectionError, ImapProtocolError
from mailferry.imap.manager import FolderStatus
from mailferry.imap.sync import Body, Extensions, FlagState, MessageMeta, Ranges, uid_windows
from mailferry.messages import (
    AnyMessage,
    FlagsChanged,
    FolderInfo,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
)
from mailferry.repository import FolderState
from mailferry.services.fetcher import planning

INBOX = FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox")
WHEN = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)


@dataclass
class FakeSession:
    """A folder of ``uids`` (sizes by UID), recording every call."""

    uids: dict[int, int]
    generation: int = 7  # the folder's UIDVALIDITY
    uidnext: int | None = None
    highest_modseq: int | None = None
    flags_of: dict[int, tuple[str, ...]] = field(default_factory=dict)
    oversized: set[int] = field(default_factory=set)
    extensions_: Extensions = field(default_factory=lambda: Extensions(False, False))
    window: int = 3
    calls: list[str] = field(default_factory=list)
    fail_on: str | None = None
    contents: dict[str, list[str]] = field(default_factory=dict)  # folder -> Message-IDs

    def extensions(self) -> Extensions:
        return self.extensions_

    def uidvalidity(self, raw_name: str) -> int | None:
        return self.generation

    def select(self, folder: FolderInfo) -> FolderStatus:
        self.calls.append("select")
        if self.fail_on == "select":
            raise ImapProtocolError("imap.example.com:993 Gone: NO [NONEXISTENT] no such folder")
        top = max(self.uids, default=0)
        return FolderStatus(uidvalidity=self.generation,
                            uidnext=self.uidnext if self.uidnext is not None else top + 1,
                            highest_modseq=self.highest_modseq, exists=len(self.uids))

    def iter_windows(self, low: int, status: FolderStatus) -> Iterator[tuple[int, int]]:
        if not status.exists:
            return iter(())
        return iter(uid_windows(low, (status.uidnext or 1) - 1, status.exists, self.window))

    def search(self, low: int, high: int | None, since: date | None = None) -> list[int]:
        self.calls.append(f"search {low}:{high}")
        if self.fail_on == "search":
            raise ImapConnectionError("imap.example.com:993: connection lost")
        return sorted(u for u in self.uids if low <= u <= (high or 2**32))

    def flags(self, low: int, high: int, *, changed_since: int | None,
              vanished: bool) -> tuple[list[FlagState], Ranges]:
        self.calls.append(f"flags {low}:{high}")
        return ([FlagState(u, self.flags_of.get(u, ()), None)
                 for u in sorted(self.uids) if low <= u <= high], Ranges([]))

    def metadata(self, uids: list[int], *, message_ids: bool = False) -> dict[int, MessageMeta]:
        self.calls.append(f"metadata {len(uids)}")
        return {u: MessageMeta(u, self.flags_of.get(u, ()), WHEN, self.uids[u],
                               f"m{u}@example.com" if message_ids else None)
                for u in uids if u in self.uids}

    def recent_message_ids(self, folder: FolderInfo, count: int) -> set[str]:
        return set(self.contents.get(folder.raw_name, ()))

    def bodies(self, uids: list[int]) -> dict[int, Body]:
        self.calls.append(f"bodies {len(uids)}")
        return {u: (Body(None, self.uids[u]) if u in self.oversized
                    else Body(b"x" * self.uids[u], self.uids[u])) for u in uids}


def _job(published: list[AnyMessage], *, max_bytes: int = 100, max_count: int = 10,
         max_message: int = 1000, stored: dict[int, frozenset[str]] | None = None,
         found: list[int] | None = None) -> planning.FolderJob:
    return planning.FolderJob(
        stamp=planning.Stamp(run_id=uuid.uuid4(), mailbox_id=1, lease_token=3),
        publish=published.append,
        stored_flags=lambda _v, low, high: {u: f for u, f in (stored or {}).items()
                                           if low <= u <= high},
        found=(found if found is not None else []).append,
        limits=planning.BatchLimits(max_bytes, max_count, max_message),
        since=date(2026, 1, 1))


def _state(last_uid: int, highest_modseq: int | None = None) -> FolderState:
    return FolderState(mailbox_id=1, raw_name="INBOX", sync_enabled=True, uidvalidity=7,
                       last_uid=last_uid, highest_modseq=highest_modseq)


def test_a_first_sync_publishes_every_message_in_byte_bounded_batches_then_the_folder() -> None:
    session = FakeSession(uids={1: 60, 2: 60, 3: 30, 4: 200})
    published: list[AnyMessage] = []
    totals = planning.sync_folder(session, INBOX, None, _job(published))
    batches = [m for m in published if isinstance(m, MessagesFetched)]
    assert [[msg.uid for msg in b.messages] for b in batches] == [[1], [2, 3], [4]]
    assert [b.batch_no for b in batches] == [0, 1, 2]
    done = published[-1]
    assert isinstance(done, FolderSynced)
    assert (done.batches, done.messages, done.last_uid) == (3, 4, 4)
    assert totals.messages == 4


def test_a_large_folder_is_searched_in_uid_windows_never_whole() -> None:
    session = FakeSession(uids={u: 1 for u in range(1, 11)}, window=3)
    found: list[int] = []
    planning.sync_folder(session, INBOX, None, _job([], found=found))
    searches = [c for c in session.calls if c.startswith("search")]
    assert searches == ["search 1:3", "search 4:6", "search 7:9", "search 10:10"]
    assert sum(found) == 10


def test_a_message_whose_bytes_exceeded_the_limit_is_recorded_without_them() -> None:
    session = FakeSession(uids={1: 10, 2: 10}, oversized={2})
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, None, _job(published))
    fetched = [m for b in published if isinstance(b, MessagesFetched) for m in b.messages]
    assert [(m.uid, m.raw is None, m.skipped_reason) for m in fetched] == [
        (1, False, None), (2, True, "larger than 1000 bytes")]


def test_an_unchanged_condstore_folder_sends_no_flag_fetch_and_no_search() -> None:
    session = FakeSession(uids={1: 5, 2: 5}, highest_modseq=9,
                          extensions_=Extensions(condstore=True, qresync=True))
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, _state(2, highest_modseq=9), _job(published))
    assert session.calls == ["select"]
    assert [type(m) for m in published] == [FolderSynced]


def test_without_condstore_only_changed_flags_and_expunged_uids_travel() -> None:
    session = FakeSession(uids={1: 5, 3: 5}, flags_of={1: ("\\Seen",), 3: ()}, uidnext=4)
    stored = {1: frozenset(), 2: frozenset(), 3: frozenset()}
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, _state(3), _job(published, stored=stored))
    changed = [m for m in published if isinstance(m, FlagsChanged)]
    expunged = [m for m in published if isinstance(m, MessagesExpunged)]
    assert [(c.uid, c.flags) for m in changed for c in m.changes] == [(1, ("\\Seen",))]
    assert [m.uids for m in expunged] == [(2,)]


def test_a_server_failure_mid_folder_says_how_many_events_went_out() -> None:
    session = FakeSession(uids={1: 5}, fail_on="search")
    with pytest.raises(planning.FolderFailed) as failure:
        planning.sync_folder(session, INBOX, None, _job([]))
    assert (failure.value.kind, failure.value.events) == ("connection", 0)


def test_a_new_folder_with_a_vanished_folders_uidvalidity_is_a_rename_synced_in_the_same_run(
) -> None:
    session = FakeSession(uids={})
    states = {"Old": FolderState(1, "Old", True, 7, 10, None)}
    listed = [INBOX.model_copy(update={"raw_name": "New", "name": "New", "type": "other"})]
    folders, renamed = planning.detect_renames(session, listed, states)
    assert renamed == {"New"}
    assert (folders[0].uidvalidity, folders[0].renamed_from) == (7, "Old")
    assert planning.folders_to_sync(folders, states, None) == folders
    assert planning.state_of(folders[0], states) is states["Old"]


def test_a_renamed_folder_goes_on_from_its_old_checkpoint_under_its_new_name() -> None:
    session = FakeSession(uids={1: 10, 2: 10, 3: 10, 4: 10}, flags_of={2: ("\\Seen",)})
    new = INBOX.model_copy(update={"raw_name": "New", "name": "New", "renamed_from": "INBOX"})
    published: list[AnyMessage] = []
    planning.sync_folder(session, new, _state(last_uid=3),
                         _job(published, stored={1: frozenset(), 2: frozenset(), 3: frozenset()}))
    assert {getattr(m, "folder", None) for m in published} == {"New"}
    assert [m.changes[0].uid for m in published if isinstance(m, FlagsChanged)] == [2]
    assert [[f.uid for f in m.messages] for m in published
            if isinstance(m, MessagesFetched)] == [[4]], "only what is above the old checkpoint"


def test_a_push_run_syncs_only_the_changed_enabled_folders_and_enables_none() -> None:
    work = INBOX.model_copy(update={"raw_name": "Work", "name": "Work", "type": "other"})
    spam = INBOX.model_copy(update={"raw_name": "Spam", "name": "Spam", "type": "spam"})
    states = {"INBOX": FolderState(1, "INBOX", True, 7, 10, None),
              "Work": FolderState(2, "Work", True, 8, 10, None),
              "Spam": FolderState(3, "Spam", False, 9, 10, None)}
    listed = [INBOX, work, spam]
    assert planning.folders_to_sync(listed, states, None, only=("Work", "Spam")) == [work]
    assert planning.folders_to_sync(listed, states, None, only=("Inbox",)) == [INBOX]
    assert planning.folders_to_sync(listed, states, None) == [INBOX, work]


def test_a_push_run_takes_the_folders_it_names_from_the_store_without_listing() -> None:
    def state(raw: str, enabled: bool = True, **info: object) -> FolderState:
        return FolderState(1, raw, enabled, 7, 10, None, name=raw, delimiter="/", **info)
    states = {"INBOX": state("INBOX", type="inbox"), "Work": state("Work", flags=("\\Marked",)),
              "Spam": state("Spam", enabled=False), "Old": state("Old", gone=True),
              "Box": state("Box", selectable=False)}
    known = planning.stored_folders(states, ("Work", "Inbox"))
    assert known == [INBOX.model_copy(update={"raw_name": "Work", "name": "Work",
                                              "type": "other", "flags": ("\\Marked",)}), INBOX]
    for refused in ("Spam", "Old", "Box", "Unknown"):  # then the run lists, as any run does
        assert planning.stored_folders(states, ("Work", refused)) is None


@pytest.mark.parametrize(("low", "high", "exists", "window", "expected"), [
    (1, 10, 10, 20, [(1, 10)]),
    (1, 10, 10, 4, [(1, 4), (5, 8), (9, 10)]),
    (1, 1000, 10, 5, [(1, 500), (501, 1000)]),  # sparse UIDs: wider windows, same yield
    (5, 4, 3, 10, []),
])
def test_uid_windows_cover_the_range_and_aim_at_the_window_size(
    low: int, high: int, exists: int, window: int, expected: list[tuple[int, int]],
) -> None:
    assert uid_windows(low, high, exists, window) == expected


def test_vanished_ranges_answer_membership_without_being_expanded() -> None:
    gone = Ranges([(5, 9), (1, 2), (10, 1_000_000_000)])
    assert [u in gone for u in (1, 3, 7, 999_999_999)] == [True, False, True, True]


def test_after_a_uidvalidity_change_stored_messages_are_recognised_not_downloaded() -> None:
    session = FakeSession(uids={1: 10, 2: 10, 3: 10}, generation=8)
    published: list[AnyMessage] = []
    job = _job(published)
    job.stored_by_identity = lambda uidvalidity, ids: {
        (mid, 10, WHEN): f"{uidvalidity:02x}" * 32 for mid in ids if mid != "m3@example.com"}
    totals = planning.sync_folder(session, INBOX, _state(40), job)
    fetched = {m.uid: m for b in published if isinstance(b, MessagesFetched) for m in b.messages}
    assert fetched[1].raw is None and fetched[1].sha256 == "07" * 32
    assert fetched[2].sha256 == "07" * 32
    assert fetched[3].raw == b"x" * 10 and fetched[3].sha256 is None
    assert "bodies 1" in session.calls and totals.recognised == 2


def test_a_vanished_enabled_folder_is_recognised_by_its_newest_message_ids() -> None:
    session = FakeSession(uids={}, contents={"Work 2": ["a", "b", "c"], "Other": ["z"]})
    states = {"Work": FolderState(1, "Work", True, 5, 10, None)}
    listed = [INBOX.model_copy(update={"raw_name": n, "name": n, "type": "other"})
              for n in ("Work 2", "Other")]
    folders, renamed = planning.detect_renames(session, listed, states, lambda _s: ["a", "c"])
    assert renamed == {"Work 2"}
    assert [f.renamed_from for f in folders] == ["Work", None]


def test_a_rename_that_two_folders_could_be_is_not_guessed() -> None:
    session = FakeSession(uids={}, contents={"A": ["a", "b"], "B": ["a", "b"]})
    states = {"Work": FolderState(1, "Work", True, 5, 10, None)}
    listed = [INBOX.model_copy(update={"raw_name": n, "name": n, "type": "other"})
              for n in ("A", "B")]
    folders, renamed = planning.detect_renames(session, listed, states, lambda _s: ["a"])
    assert renamed == set()
    assert all(f.renamed_from is None for f in folders)


def test_a_folder_the_server_will_not_open_fails_alone_with_no_event_out() -> None:
    session = FakeSession(uids={1: 5}, fail_on="select")
    with pytest.raises(planning.FolderFailed) as failure:
        planning.sync_folder(session, INBOX, None, _job([]))
    assert (failure.value.kind, failure.value.events) == ("protocol", 0)


def _slices(session: FakeSession, state: FolderState | None, job: planning.FolderJob,
            published: list[AnyMessage]) -> int:
    """Sync the folder pausing after every batch, resuming each time; returns the slices."""
    resume = None
    for count in range(1, 100):
        try:
            planning.sync_folder(session, INBOX, state, job, resume)
        except planning.FolderPaused as paused:
            resume = paused.resume
            continue
        return count
    raise AssertionError("the folder never finished")


def test_a_folder_paused_after_every_batch_publishes_each_message_once_numbered_on() -> None:
    uids = {u: 40 for u in range(1, 12)}
    published: list[AnyMessage] = []
    job = _job(published)
    job.pause = lambda: True
    slices = _slices(FakeSession(uids=dict(uids)), _state(0), job, published)
    fetched = [e for e in published if isinstance(e, MessagesFetched)]
    closing = [e for e in published if isinstance(e, FolderSynced)]
    assert slices == len(fetched) > 3  # one batch a slice
    assert [m.uid for e in fetched for m in e.messages] == sorted(uids)
    assert [e.batch_no for e in fetched] == list(range(len(fetched)))
    assert [(e.batches, e.messages, e.last_uid) for e in closing] == [(len(fetched), 11, 11)]


def test_a_resumed_folder_does_not_redo_its_flag_pass_nor_search_below_where_it_stopped() -> None:
    session = FakeSession(uids={u: 40 for u in range(1, 12)}, window=100)
    published: list[AnyMessage] = []
    job = _job(published)
    job.pause = lambda: True
    with pytest.raises(planning.FolderPaused) as first:
        planning.sync_folder(session, INBOX, _state(2), job)
    resume = first.value.resume
    assert (resume.next_uid, resume.above, resume.events) == (5, 2, 1)
    session.calls.clear()
    job.pause = lambda: False
    planning.sync_folder(session, INBOX, _state(2), job, resume)
    assert not [c for c in session.calls if c.startswith("flags")]
    assert [c for c in session.calls if c.startswith("search")] == ["search 5:11"]
    done = published[-1]
    assert isinstance(done, FolderSynced)
    assert (done.batches, done.last_uid, done.messages) == (5, 11, 9)


def test_a_uidvalidity_reset_between_two_slices_starts_the_folder_over_numbering_on() -> None:
    session = FakeSession(uids={u: 40 for u in range(1, 6)})
    published: list[AnyMessage] = []
    job = _job(published)
    job.pause = lambda: True
    with pytest.raises(planning.FolderPaused) as first:
        planning.sync_folder(session, INBOX, None, job)
    session.generation = 8
    job.pause = lambda: False
    planning.sync_folder(session, INBOX, None, job, first.value.resume)
    fetched = [e for e in published if isinstance(e, MessagesFetched)]
    assert [e.batch_no for e in fetched] == list(range(len(fetched)))
    assert [e.uidvalidity for e in fetched][-1] == 8
    assert sorted(m.uid for e in fetched if e.uidvalidity == 8
                  for m in e.messages) == [1, 2, 3, 4, 5]
