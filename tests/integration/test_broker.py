"""The consumer contract on a real RabbitMQ: ack after the work, retry through delay queues,
dead-letter with the reason, never drop."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from shared import messages, topology
from shared.broker import ERROR_HEADER, Delivery, Publisher, Worker, connect
from shared.config import Settings
from shared.errors import PermanentError
from tests.support import services

DELAYS = (0.2, 0.4)


def _command() -> messages.SyncMailbox:
    return messages.SyncMailbox(run_id=uuid.uuid4(), mailbox_id=1)


@contextmanager
def _worker(settings: Settings,
            handler: Callable[[messages.AnyMessage, Delivery], None]) -> Iterator[Publisher]:
    publisher = Publisher(settings.broker_url, DELAYS)
    worker = Worker(url=settings.broker_url, work=topology.FETCHER, handler=handler,
                    publisher=publisher, retry_delays=DELAYS)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield publisher
    finally:
        worker.should_stop = True
        thread.join(timeout=10)
        publisher.close()


def _dead_letters(settings: Settings) -> list[Any]:
    out = []
    with connect(settings.broker_url) as conn:
        queue = topology.FETCHER.dead_letter_queue()(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            out.append(message)
    return out


def test_a_handled_message_is_acked_and_leaves_the_queue(settings: Settings, vhost: tuple[str, str]
                                                         ) -> None:
    seen: list[messages.AnyMessage] = []
    command = _command()
    with _worker(settings, lambda m, _: seen.append(m)) as publisher:
        publisher.publish(command)
        assert services.eventually(lambda: seen)
    assert seen == [command]
    info = services.queue_info(vhost[0], topology.FETCHER.name)
    assert info["arguments"]["x-queue-type"] == "quorum"  # type: ignore[index]
    with connect(settings.broker_url) as conn:
        declared = conn.default_channel.queue_declare(topology.FETCHER.name, passive=True)
    assert declared.message_count == 0


def test_a_transient_failure_is_retried_after_a_delay_and_then_succeeds(
    settings: Settings
) -> None:
    attempts: list[messages.AnyMessage] = []

    def flaky(message: messages.AnyMessage, _: Delivery) -> None:
        attempts.append(message)
        if len(attempts) < 3:
            raise ConnectionError("server away")

    with _worker(settings, flaky) as publisher:
        publisher.publish(_command())
        assert services.eventually(lambda: len(attempts) >= 3, timeout=15)
    assert len(attempts) == 3
    assert _dead_letters(settings) == []


def test_a_message_that_keeps_failing_is_dead_lettered_with_its_reason(settings: Settings) -> None:
    calls: list[int] = []

    def broken(_: messages.AnyMessage, delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        raise RuntimeError("cannot do it")

    with _worker(settings, broken) as publisher:
        publisher.publish(_command())
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert calls == [0, 1, 2]  # the last one knew it was the last
    [message] = dead
    assert message.headers[ERROR_HEADER] == "retries exhausted; last error: RuntimeError: cannot do it"
    assert message.properties["type"] == "SyncMailbox"


def test_a_permanent_failure_is_dead_lettered_at_once(settings: Settings) -> None:
    calls: list[int] = []

    def refuses(_: messages.AnyMessage, __: Delivery) -> None:
        calls.append(1)
        raise PermanentError("mailbox settings are wrong")

    with _worker(settings, refuses) as publisher:
        publisher.publish(_command())
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert len(calls) == 1
    assert dead[0].headers[ERROR_HEADER] == "PermanentError: mailbox settings are wrong"


def test_a_malformed_message_is_dead_lettered_not_dropped(settings: Settings) -> None:
    handled: list[messages.AnyMessage] = []
    with _worker(settings, lambda m, _: handled.append(m)) as publisher:
        publisher.publish_raw(b'{"type": "SyncMailbox", "mailbox_id": "x"}',
                              exchange=topology.COMMANDS.name, routing_key="sync-mailbox",
                              type_="SyncMailbox")
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert handled == []
    body = dead[0].body
    assert (body.encode() if isinstance(body, str) else body) == b'{"type": "SyncMailbox", "mailbox_id": "x"}'
    assert dead[0].headers[ERROR_HEADER].startswith("malformed message:")


def _mail_batch() -> messages.MessagesFetched:
    raw = b"Subject: x\r\n\r\n" + bytes(range(256)) * 64
    return messages.MessagesFetched(
        run_id=uuid.uuid4(), mailbox_id=1, lease_token=1, folder="INBOX", uidvalidity=1,
        batch_no=0, messages=(messages.FetchedMessage(uid=1, size=len(raw), raw=raw),
                              messages.FetchedMessage(uid=2, size=3, raw=b"a\r\n")))


def test_a_batch_of_mail_keeps_its_bytes_and_content_type_through_retries_and_dead_letters(
    settings: Settings
) -> None:
    event = _mail_batch()
    seen: list[messages.AnyMessage] = []

    def broken(message: messages.AnyMessage, _: Delivery) -> None:
        seen.append(message)
        raise RuntimeError("database away")

    with _worker(settings, broken) as publisher:
        publisher.publish_raw(messages.encode(event), exchange="", routing_key=topology.FETCHER.name,
                              type_=event.type, content_type=messages.content_type(event))
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert seen == [event] * 3
    [message] = dead
    assert message.content_type == messages.BLOBS_CONTENT_TYPE
    assert message.body == messages.encode(event)


def test_a_batch_whose_json_part_lies_about_its_bytes_is_dead_lettered_not_a_crash(
    settings: Settings
) -> None:
    body = messages.encode(_mail_batch())
    handled: list[messages.AnyMessage] = []
    with _worker(settings, lambda m, _: handled.append(m)) as publisher:
        for bad in (body[:-1], body + b"x"):  # truncated; bytes nobody claims
            publisher.publish_raw(bad, exchange="", routing_key=topology.FETCHER.name,
                                  type_="MessagesFetched",
                                  content_type=messages.BLOBS_CONTENT_TYPE)
        dead: list[Any] = []
        assert services.eventually(lambda: dead.extend(_dead_letters(settings)) or
                                   len(dead) == 2, timeout=15)
        publisher.publish(_command())  # the consumer is still there
        assert services.eventually(lambda: handled, timeout=15)
    assert [type(m) for m in handled] == [messages.SyncMailbox]
    assert sorted(m.body for m in dead) == sorted([body[:-1], body + b"x"])
    assert all(m.headers[ERROR_HEADER].startswith("malformed message: ") for m in dead)
