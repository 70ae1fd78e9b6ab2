"""Commands published several at a time (a tick, `sync --all`): every command is accounted for
as published, failed or never tried, so that the caller can mark, withdraw or report each."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from mailferry.errors import BrokerUnavailable
from mailferry.messages import AnyMessage, SyncMailbox
from mailferry.sync_requests import _publish_all

COMMANDS = [SyncMailbox(run_id=uuid.uuid4(), mailbox_id=n, force=False, requested_by="test")
            for n in range(1, 41)]


@pytest.mark.parametrize("parallel", [1, 8])
def test_without_a_failure_every_command_is_published_once(parallel: int) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def publish(message: AnyMessage) -> None:
        assert isinstance(message, SyncMailbox)
        with lock:
            seen.append(message.mailbox_id)

    published, failed, skipped = _publish_all(publish, list(COMMANDS), parallel)
    assert sorted(seen) == sorted(m.mailbox_id for m in published) == list(range(1, 41))
    assert failed == [] and skipped == []


@pytest.mark.parametrize("parallel", [1, 8])
def test_after_a_broker_failure_the_rest_is_not_tried_and_nothing_is_lost(parallel: int) -> None:
    def publish(message: AnyMessage) -> None:
        assert isinstance(message, SyncMailbox)
        if message.mailbox_id == 5:
            raise BrokerUnavailable("publish to RabbitMQ failed: injected")
        time.sleep(0.005)  # a confirm takes a while: the failure is seen before the last ones

    published, failed, skipped = _publish_all(publish, list(COMMANDS), parallel)
    assert [m.mailbox_id for m, _ in failed] == [5]
    everything = [m.mailbox_id for m in published] + [5] + [m.mailbox_id for m in skipped]
    assert sorted(everything) == list(range(1, 41))
    assert skipped, "commands after the failure were still published"
    if parallel == 1:
        assert [m.mailbox_id for m in published] == [1, 2, 3, 4]
