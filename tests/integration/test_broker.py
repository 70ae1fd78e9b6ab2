"""The consumer contract on a real RabbitMQ: ack after the work, retry through delay queues,
dead-letter with the reason, never drop."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import pytest

from mailferry import messages, topology
from mailferry.broker import (
    ATTEMPT_HEADER,
    ERROR_HEADER,
    Outgoing,
    Publisher,
    Unroutable,
    Worker,
    connect,
)
from mailferry.config import Settings
from mailferry.devkit import services
from mailferry.errors import PermanentError

DELAYS = (0.2, 0.4)


def _command() -> messages.SyncMailbox:
    return messages.SyncMailbox(run_id=uuid.uuid4(), mailbox_id=1)


@contextmanager
def _worker(settings: Settings, handler: Callable[[Any], None],
            exhausted: list[tuple[messages.AnyMessage, BaseException]] | None = None,
            concurrency: int = 1, heartbeat: float = 30.0) -> Iterator[Publisher]:
    """A fetcher-queue worker whose HANDLERS send SyncMailbox and MessagesFetched to
    ``handler``; SyncFolders has no handler."""
    publisher = Publisher(settings.broker_url, DELAYS)
    worker = Worker(url=settings.broker_url, work=topology.FETCHER,
                    handlers={messages.SyncMailbox: handler, messages.MessagesFetched: handler},
                    publisher=publisher, retry_delays=DELAYS, concurrency=concurrency,
                    prefetch=concurrency, heartbeat=heartbeat,
                    on_retry_exhausted=(lambda m, e: exhausted.append((m, e)))
                    if exhausted is not None else None)
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
    with _worker(settings, lambda m: seen.append(m)) as publisher:
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

    def flaky(message: messages.AnyMessage) -> None:
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
    exhausted: list[tuple[messages.AnyMessage, BaseException]] = []
    command = _command()

    def broken(_: messages.AnyMessage) -> None:
        calls.append(1)
        raise RuntimeError("cannot do it")

    with _worker(settings, broken, exhausted) as publisher:
        publisher.publish(command)
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert len(calls) == 3  # the first try and two retries
    assert [(m, str(e)) for m, e in exhausted] == [(command, "cannot do it")]  # the one hook
    [message] = dead
    assert message.headers[ERROR_HEADER] == "retries exhausted; last error: RuntimeError: cannot do it"
    assert message.properties["type"] == "SyncMailbox"


def test_a_permanent_failure_is_dead_lettered_at_once(settings: Settings) -> None:
    calls: list[int] = []

    def refuses(_: messages.AnyMessage) -> None:
        calls.append(1)
        raise PermanentError("mailbox settings are wrong")

    with _worker(settings, refuses) as publisher:
        publisher.publish(_command())
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert len(calls) == 1
    assert dead[0].headers[ERROR_HEADER] == "PermanentError: mailbox settings are wrong"


def test_a_malformed_message_is_dead_lettered_not_dropped(settings: Settings) -> None:
    handled: list[messages.AnyMessage] = []
    with _worker(settings, lambda m: handled.append(m)) as publisher:
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

    def broken(message: messages.AnyMessage) -> None:
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
    with _worker(settings, lambda m: handled.append(m)) as publisher:
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


def test_a_type_the_queue_has_no_handler_for_is_dead_lettered_never_silently_acked(
    settings: Settings
) -> None:
    handled: list[messages.AnyMessage] = []
    stray = messages.SyncFolders(run_id=uuid.uuid4(), mailbox_id=1)
    with _worker(settings, handled.append) as publisher:
        publisher.publish(stray)
        dead = services.eventually(lambda: _dead_letters(settings), timeout=15)
    assert handled == []
    assert dead[0].headers[ERROR_HEADER] == (
        f"no handler for SyncFolders on {topology.FETCHER.name}")


def test_an_unreadable_attempt_header_dead_letters_that_message_and_the_consumer_lives_on(
    settings: Settings
) -> None:
    handled: list[messages.AnyMessage] = []
    command = _command()
    with _worker(settings, handled.append) as publisher:
        for bad in ("abc", -1, 10**12, 1.5, [1]):
            publisher.publish_raw(messages.encode(command), exchange=topology.COMMANDS.name,
                                  routing_key="sync-mailbox", type_="SyncMailbox",
                                  headers={ATTEMPT_HEADER: bad})
        dead: list[Any] = []
        assert services.eventually(lambda: dead.extend(_dead_letters(settings)) or
                                   len(dead) == 5, timeout=15)
        publisher.publish(command)  # and the consumer is still there
        assert services.eventually(lambda: handled, timeout=15)
    assert handled == [command]
    assert all(m.headers[ERROR_HEADER].startswith(f"unreadable header {ATTEMPT_HEADER}: ")
               for m in dead)


def test_a_publish_that_no_queue_takes_raises_instead_of_vanishing(settings: Settings) -> None:
    publisher = Publisher(settings.broker_url, DELAYS)
    try:
        with pytest.raises(Unroutable, match="no queue takes SyncMailbox"):
            publisher.publish_raw(messages.encode(_command()), exchange=topology.COMMANDS.name,
                                  routing_key="no-such-route", type_="SyncMailbox")
        publisher.publish(_command())  # the publisher still works afterwards
    finally:
        publisher.close()


def test_a_command_published_by_hand_without_requested_by_says_broker() -> None:
    decoded = messages.decode(f'{{"type": "SyncMailbox", "run_id": "{uuid.uuid4()}", '
                              '"mailbox_id": 7}'.encode())
    assert isinstance(decoded, messages.SyncMailbox)
    assert decoded.requested_by == "broker"


def _queue_is_empty(settings: Settings) -> bool:
    with connect(settings.broker_url) as conn:
        declared = conn.default_channel.queue_declare(topology.FETCHER.name, passive=True)
    return bool(declared.message_count == 0)


def test_a_worker_runs_as_many_handlers_at_once_as_its_concurrency_and_acks_each(
    settings: Settings
) -> None:
    together = threading.Barrier(3, timeout=10)  # passes only if three handlers wait at once
    done: list[messages.AnyMessage] = []

    def waits_for_the_others(message: messages.AnyMessage) -> None:
        together.wait()
        done.append(message)

    with _worker(settings, waits_for_the_others, concurrency=3) as publisher:
        commands = [_command() for _ in range(3)]
        for command in commands:
            publisher.publish(command)
        assert services.eventually(lambda: len(done) == 3, timeout=15)
        time.sleep(0.5)  # the acks go out
    assert _queue_is_empty(settings)  # acked: nothing came back when the worker stopped
    assert sorted(str(m.run_id) for m in done) == sorted(str(c.run_id) for c in commands)
    assert not together.broken
    assert _dead_letters(settings) == []


def test_a_handler_longer_than_two_heartbeats_keeps_its_connection_and_runs_once(
    settings: Settings, vhost: tuple[str, str]
) -> None:
    calls: list[messages.AnyMessage] = []
    finished: list[messages.AnyMessage] = []
    heartbeats: list[object] = []

    def slow(message: messages.AnyMessage) -> None:
        calls.append(message)
        started = time.monotonic()

        def negotiated() -> list[object]:
            listed = services.rabbit_api("GET", f"/vhosts/{quote(vhost[0], safe='')}"
                                                "/connections")
            assert isinstance(listed, list)
            return [c.get("timeout") for c in listed if c.get("timeout")]

        heartbeats.extend(services.eventually(negotiated, timeout=6, interval=0.5))
        # RabbitMQ closes a connection silent for two heartbeats (2 s each)
        time.sleep(max(0.0, 8 - (time.monotonic() - started)))
        finished.append(message)

    with _worker(settings, slow, heartbeat=2) as publisher:
        publisher.publish(_command())
        assert services.eventually(lambda: finished, timeout=30)
        time.sleep(1)  # the ack goes out; a redelivery would show now
    assert len(calls) == 1
    assert _queue_is_empty(settings)
    assert 2 in heartbeats  # the consuming connection negotiated 2 s heartbeats


def test_a_batch_published_with_one_wait_for_its_confirms_arrives_whole_and_in_order(
    settings: Settings,
) -> None:
    publisher = Publisher(settings.broker_url, DELAYS)
    try:
        with connect(settings.broker_url) as conn:
            channel = conn.channel()
            topology.CHANGES(channel).declare()
            channel.queue_declare("probe.changes", durable=True)
            channel.queue_bind("probe.changes", topology.CHANGES.name, "mailbox.#")
            publisher.publish_many([
                Outgoing(body=f'{{"n": {n}}}'.encode(), routing_key="mailbox.1.message_stored",
                         type_="MessageStored", headers={"schema-version": 1})
                for n in range(1200)], exchange=topology.CHANGES.name)
            # a single confirmed publish after the batch waits for its own confirm only
            publisher.publish_raw(b'{"n": "last"}', exchange=topology.CHANGES.name,
                                  routing_key="mailbox.1.message_stored", type_="MessageStored",
                                  mandatory=False)
            received = []
            while (message := channel.basic_get("probe.changes", no_ack=True)) is not None:
                received.append((message.body, message.properties["type"],
                                 message.properties["delivery_mode"]))
    finally:
        publisher.close()
    assert [body for body, _, _ in received] == [  # JSON: the client decodes it as UTF-8
        f'{{"n": {n}}}' for n in range(1200)] + ['{"n": "last"}']
    assert {(t, mode) for _, t, mode in received} == {("MessageStored", 2)}
