"""Provider limits without I/O: which answers are throttling, and the download budget's plan."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from mailferry import budget
from mailferry.budget import Budget
from mailferry.config import Settings
from mailferry.errors import backoff
from mailferry.imap.connection import throttled
from mailferry.messages import AnyMessage, FolderSynced, MessagesFetched
from mailferry.repository import FolderState
from mailferry.services.fetcher import planning
from tests.unit.test_fetcher_planning import INBOX, FakeSession

# What providers send when they limit an account (README "Provider limits").
THROTTLING = [
    "[ALERT] Too many simultaneous connections. (Failure)",  # Gmail, at login
    "[THROTTLED] Account exceeded command or bandwidth limits",  # Gmail
    "[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)",  # Gmail
    "[UNAVAILABLE] Maximum number of connections from user+IP exceeded "
    "(mail_max_userip_connections=10)",  # Dovecot
    "Request is throttled. Suggested Backoff Time: 299961 milliseconds",  # Exchange Online
    "Server Unavailable. 15",  # Exchange
    "System busy: rate limit exceeded",  # a BYE with a rate-limit text
]


@pytest.mark.parametrize("answer", THROTTLING)
def test_each_provider_limit_answer_is_throttling(answer: str) -> None:
    error = throttled("imap.example.com:993", answer)
    assert error is not None
    assert error.kind == "throttled"


@pytest.mark.parametrize("answer", [
    "[AUTHENTICATIONFAILED] Invalid credentials (Failure)",
    "[NONEXISTENT] Unknown Mailbox: Archive",
    "socket error: EOF",
])
def test_a_refused_login_or_a_plain_error_is_not_throttling(answer: str) -> None:
    assert throttled("imap.example.com:993", answer) is None


def test_exchanges_suggested_backoff_is_kept_in_seconds() -> None:
    error = throttled("outlook.office365.com:993", THROTTLING[4])
    assert error is not None and error.retry_after == pytest.approx(299.961)


def test_the_back_off_doubles_from_its_base_up_to_its_cap_with_its_jitter_share_random() -> None:
    waits = [[backoff(n, 300, 3600) for _ in range(200)] for n in (1, 2, 3, 4, 5, 99)]
    for wait, longest in zip(waits, (300, 600, 1200, 2400, 3600, 3600), strict=True):
        assert longest / 2 <= min(wait) < max(wait) <= longest  # half fixed, half random
    assert [backoff(n, 1.0, 30.0, jitter=0.0) for n in range(1, 7)] == [1, 2, 4, 8, 16, 30]
    assert 0.0 <= min(backoff(3, 1.0, 30.0, jitter=1.0) for _ in range(200)) < 1.0


def test_gmail_hosts_have_a_daily_budget_and_others_none_unless_set() -> None:
    assert budget.limit_for("imap.gmail.com", Settings()) == 2500 * budget.MB
    assert budget.limit_for("IMAP.googlemail.com.", Settings()) == 2500 * budget.MB
    assert budget.limit_for("imap.example.com", Settings()) is None
    assert budget.limit_for("imap.example.com", Settings(download_budget_mb=3)) == 3 * budget.MB
    # the smaller of the setting and the preset
    assert budget.limit_for("imap.gmail.com", Settings(download_budget_mb=5000)) == 2500 * budget.MB


def test_connections_per_account_come_from_the_providers_presets_or_dovecots_default() -> None:
    assert budget.connection_limits("imap.gmail.com", Settings()) == (15, None)
    assert budget.connection_limits("Outlook.Office365.com.", Settings()) == (20, None)
    assert budget.connection_limits("imap.example.com", Settings()) == (10, None)
    # the setting for every host, the smaller of it and a preset where there is one
    assert budget.connection_limits("imap.example.com",
                                    Settings(max_connections_per_account=30)) == (30, None)
    assert budget.connection_limits("imap.gmail.com",
                                    Settings(max_connections_per_account=30)) == (15, None)
    assert budget.connection_limits("imap.gmail.com",
                                    Settings(max_connections_per_account=4)) == (4, None)
    assert budget.connection_limits("imap.example.com",
                                    Settings(max_connections_per_host=50)) == (10, 50)


def _job(published: list[AnyMessage], allowance: Budget) -> planning.FolderJob:
    return planning.FolderJob(
        stamp=planning.Stamp(run_id=uuid.uuid4(), mailbox_id=1, lease_token=3),
        publish=published.append, stored_flags=lambda *_: {}, found=lambda _n: None,
        limits=planning.BatchLimits(10_000, 2, 10_000), since=date(2026, 1, 1),
        budget=allowance)


def _fetched(published: list[AnyMessage]) -> list[int]:
    return [m.uid for e in published if isinstance(e, MessagesFetched) for m in e.messages]


def _synced(published: list[AnyMessage]) -> FolderSynced:
    done = published[-1]
    assert isinstance(done, FolderSynced)
    return done


def test_a_first_sync_under_a_budget_goes_newest_first_and_resumes_below_where_it_stopped() -> None:
    # ten messages of 1,000 bytes: each costs 2,024 bytes of budget (the overhead counted)
    session = FakeSession(uids={uid: 1000 for uid in range(1, 11)}, window=4)
    per_run = 3 * budget.cost(1000)
    stored: set[int] = set()
    state: FolderState | None = None
    runs: list[list[int]] = []
    while state is None or state.backfill_below is not None:
        published: list[AnyMessage] = []
        allowance = Budget(per_run)
        planning.sync_folder(session, INBOX, state, _job(published, allowance))
        runs.append(_fetched(published))
        assert allowance.used <= per_run
        done = _synced(published)
        assert done.last_uid == 10  # the checkpoint is the top from the first run on
        state = FolderState(mailbox_id=1, raw_name="INBOX", sync_enabled=True, uidvalidity=7,
                            last_uid=done.last_uid or 0, highest_modseq=None,
                            backfill_below=done.backfill_below)
        stored |= set(runs[-1])
        assert len(runs) < 10, runs
    assert runs == [[10, 9, 8], [7, 6, 5], [4, 3, 2], [1]]
    assert stored == set(range(1, 11))


def test_new_mail_comes_before_the_rest_of_a_cut_first_sync() -> None:
    session = FakeSession(uids={uid: 1000 for uid in range(1, 13)}, window=4)
    state = FolderState(mailbox_id=1, raw_name="INBOX", sync_enabled=True, uidvalidity=7,
                        last_uid=10, highest_modseq=None, backfill_below=8)
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, state, _job(published, Budget(3 * budget.cost(1000))))
    assert _fetched(published) == [11, 12, 7]
    assert (_synced(published).last_uid, _synced(published).backfill_below) == (12, 7)


def test_new_mail_cut_by_the_budget_keeps_the_checkpoint_below_what_was_left() -> None:
    session = FakeSession(uids={uid: 1000 for uid in range(1, 16)}, window=4)
    state = FolderState(mailbox_id=1, raw_name="INBOX", sync_enabled=True, uidvalidity=7,
                        last_uid=10, highest_modseq=None)
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, state, _job(published, Budget(2 * budget.cost(1000))))
    assert _fetched(published) == [11, 12]
    assert (_synced(published).last_uid, _synced(published).backfill_below) == (12, None)


def test_a_message_larger_than_the_whole_budget_is_recorded_without_its_bytes() -> None:
    session = FakeSession(uids={1: 500, 2: 50_000, 3: 500})
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, None, _job(published, Budget(10_000)))
    messages = {m.uid: m for e in published if isinstance(e, MessagesFetched) for m in e.messages}
    assert sorted(messages) == [1, 2, 3]
    assert messages[2].raw is None and "download budget" in (messages[2].skipped_reason or "")
    assert _synced(published).backfill_below is None


def test_without_a_budget_a_first_sync_keeps_its_oldest_first_order() -> None:
    session = FakeSession(uids={uid: 1000 for uid in range(1, 6)})
    published: list[AnyMessage] = []
    planning.sync_folder(session, INBOX, None, _job(published, Budget()))
    assert _fetched(published) == [1, 2, 3, 4, 5]
    assert _synced(published).backfill_below is None


def _sliced(session: FakeSession, state: FolderState | None,
            job: planning.FolderJob) -> list[planning.FolderResume]:
    """Sync the folder pausing after every batch, resuming each time (as ContinueSync does);
    returns where each slice stopped."""
    from mailferry.messages import FolderResume

    stops: list[FolderResume] = []
    job.pause = lambda: True
    for _ in range(100):
        try:
            planning.sync_folder(session, INBOX, state, job, stops[-1] if stops else None)
        except planning.FolderPaused as paused:
            stops.append(paused.resume)
            continue
        return stops
    raise AssertionError("the folder never finished")


def test_a_sliced_first_sync_under_a_budget_stays_newest_first_across_its_slices() -> None:
    session = FakeSession(uids={uid: 1000 for uid in range(1, 11)}, window=4)
    published: list[AnyMessage] = []
    # the same budget object across slices: each slice's is opened from the stored usage
    stops = _sliced(session, None, _job(published, Budget(5 * budget.cost(1000))))
    assert len(stops) >= 2 and all(s.newest_first for s in stops)
    assert _fetched(published) == [10, 9, 8, 7, 6]
    done = _synced(published)
    assert (done.last_uid, done.backfill_below, done.messages) == (10, 6, 5)
    assert [e.batch_no for e in published if isinstance(e, MessagesFetched)] == list(range(3))


def test_a_sliced_backfill_fetches_new_mail_first_then_goes_on_below_where_it_paused() -> None:
    session = FakeSession(uids={uid: 1000 for uid in range(1, 15)}, window=4)
    state = FolderState(mailbox_id=1, raw_name="INBOX", sync_enabled=True, uidvalidity=7,
                        last_uid=10, highest_modseq=None, backfill_below=8)
    published: list[AnyMessage] = []
    stops = _sliced(session, state, _job(published, Budget(8 * budget.cost(1000))))
    assert any(s.below is not None for s in stops)  # paused inside the backfill too
    assert _fetched(published) == [11, 12, 13, 14, 7, 6, 5, 4]
    done = _synced(published)
    assert (done.last_uid, done.backfill_below) == (14, 4)


def test_a_sliced_backfill_that_ends_clears_backfill_below() -> None:
    session = FakeSession(uids={uid: 1000 for uid in range(1, 11)}, window=2)
    state = FolderState(mailbox_id=1, raw_name="INBOX", sync_enabled=True, uidvalidity=7,
                        last_uid=10, highest_modseq=None, backfill_below=6)
    published: list[AnyMessage] = []
    _sliced(session, state, _job(published, Budget(100 * budget.cost(1000))))
    assert _fetched(published) == [5, 4, 3, 2, 1]
    assert (_synced(published).last_uid, _synced(published).backfill_below) == (10, None)
