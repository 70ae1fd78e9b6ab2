"""An attempt's events on their way out: the small ones are held until message data goes, and a
sync that sent none is one SyncCompleted."""

from __future__ import annotations

import uuid
from typing import cast

import pytest

from mailferry.db import Connection
from mailferry.errors import LeaseLost
from mailferry.messages import (
    AnyMessage,
    FetchedMessage,
    FolderInfo,
    FolderSynced,
    MessagesFetched,
    SyncCompleted,
    SyncFinished,
    SyncStarted,
)
from mailferry.services.fetcher.attempt import Attempt
from mailferry.services.fetcher.lease import Lease

INBOX = FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox")


def _attempt(sent: list[AnyMessage]) -> Attempt:
    lease = Lease("", mailbox_id=3, token=5, seconds=60.0)  # never started: no database
    attempt = Attempt(uuid.uuid4(), 3, lease, cast(Connection, None), sent.append)
    attempt.started("f-1")
    attempt.folders_listed([INBOX], first_listing=False)
    return attempt


def _folder_synced(attempt: Attempt, batches: int) -> FolderSynced:
    s = attempt.stamp
    return FolderSynced(run_id=s.run_id, mailbox_id=s.mailbox_id, lease_token=s.lease_token,
                        folder="INBOX", uidvalidity=9, uidnext=3, last_uid=2, batches=batches,
                        messages=batches)


def test_a_sync_that_fetched_nothing_is_published_as_one_event_at_its_end() -> None:
    sent: list[AnyMessage] = []
    attempt = _attempt(sent)
    attempt.publish(_folder_synced(attempt, batches=0))
    assert sent == []

    attempt.finished(1)

    assert [type(m) for m in sent] == [SyncCompleted]
    completed = sent[0]
    assert isinstance(completed, SyncCompleted)
    assert completed.lease_token == 5 and completed.folders == (INBOX,)
    assert [f.last_uid for f in completed.synced] == [2]


def test_the_held_events_go_first_once_message_data_goes_and_the_rest_as_they_come() -> None:
    sent: list[AnyMessage] = []
    attempt = _attempt(sent)
    s = attempt.stamp
    batch = MessagesFetched(run_id=s.run_id, mailbox_id=s.mailbox_id, lease_token=s.lease_token,
                            folder="INBOX", uidvalidity=9, batch_no=0, messages=(FetchedMessage(
                                uid=2, size=1, raw=b"x"),))

    attempt.publish(batch)
    attempt.publish(_folder_synced(attempt, batches=1))
    attempt.finished(1)

    assert [m.type for m in sent] == ["SyncStarted", "FoldersListed", "MessagesFetched",
                                      "FolderSynced", "SyncFinished"]


def test_a_failed_attempt_publishes_what_it_held_before_its_failure() -> None:
    sent: list[AnyMessage] = []
    attempt = _attempt(sent)

    attempt.failed("timeout", "the server went away")

    assert [m.type for m in sent] == ["SyncStarted", "FoldersListed", "SyncFailed"]


def test_an_attempt_whose_lease_was_taken_over_publishes_nothing_it_held() -> None:
    sent: list[AnyMessage] = []
    attempt = _attempt(sent)
    attempt.lease._lost.set()

    with pytest.raises(LeaseLost):
        attempt.finished(0)
    attempt.flush_quietly()

    assert sent == []


def test_a_later_slice_of_an_attempt_holds_nothing() -> None:
    sent: list[AnyMessage] = []
    lease = Lease("", mailbox_id=3, token=5, seconds=60.0)
    attempt = Attempt(uuid.uuid4(), 3, lease, cast(Connection, None), sent.append)

    attempt.publish(_folder_synced(attempt, batches=0))
    attempt.finished(1)

    assert [type(m) for m in sent] == [FolderSynced, SyncFinished]
    assert not any(isinstance(m, SyncStarted) for m in sent)
