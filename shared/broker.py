"""The AMQP adapter (kombu): a confirming publisher and a consumer that acks only after its work.

Publishing: persistent messages, publisher confirms (``confirm_publish``), the topology declared
before the first publish, the message type as the AMQP ``type`` property, the body's format as its
``content_type`` (JSON, or JSON followed by raw mail for ``MessagesFetched``: ``shared.messages``).

Publishing is ``mandatory``: a message that no queue takes comes back from RabbitMQ and raises
:class:`Unroutable` instead of vanishing. One retry policy: a publish that meets a broken
connection reconnects and tries again, ``PUBLISH_ATTEMPTS`` times in all, then raises
``BrokerUnavailable``.

Consuming (:class:`Worker`): each service declares a ``HANDLERS`` map from message type to a plain
function; the message is acked only after it returns, i.e. after its effect is committed (DESIGN
invariant 1). Handlers run on a pool of ``concurrency`` threads (1 for every service but the
fetcher, which waits on IMAP servers); the consuming thread only receives deliveries, acks them
when their handler is done (kombu channels are not thread-safe: every ack happens on the thread
that owns the channel) and keeps AMQP heartbeats flowing, so a long handler never starves them.
A failure is never acked and dropped, and never requeued in a loop:
- a malformed message, a header mailferry cannot read, a type the queue has no handler for, or a
  ``PermanentError``: published to the dead-letter queue with its reason, then acked;
- anything else: published to the next retry queue (exponential delays) with the attempt count,
  then acked; after the last delay, dead-lettered. A ``TransientError`` with ``retry_after``
  (the other side said when to come back) goes to a queue whose delay is at least that long,
  up to the longest one (:func:`retry_delay`);
- a ``Postponed`` (the work cannot start yet: a connection budget is full) goes to the retry
  queue whose delay is at least its ``retry_after``, with its attempt count unchanged: waiting
  spends no retry and never ends in a dead letter;
- when a message will not be tried again (either way), the service's one
  ``on_retry_exhausted(message, exc)`` hook records what that means (a run closed as failed);
- if even the republish fails, the message is rejected back to its queue (RabbitMQ counts it: after
  ``DELIVERY_LIMIT`` deliveries it is dead-lettered by the broker).
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from kombu.connection import Connection
from kombu.exceptions import OperationalError
from kombu.messaging import Consumer, Producer
from kombu.mixins import ConsumerMixin
from kombu.transport.base import Message
from pydantic import ValidationError

from mailferry import messages, metrics, topology
from mailferry.errors import BrokerUnavailable, PermanentError, Postponed, TransientError

log = structlog.get_logger(__name__)

ATTEMPT_HEADER = "x-mailferry-attempt"
ERROR_HEADER = "x-mailferry-error"
PUBLISH_ATTEMPTS = (0.0, 0.5, 1.0, 2.0, 4.0)  # seconds to wait before each try of a publish
MAX_ATTEMPT = 1000  # an attempt header beyond this is not ours


class Unroutable(PermanentError):
    """RabbitMQ returned a mandatory message: no queue is bound for its routing key."""


HEARTBEAT = 30.0  # seconds: AMQP heartbeats of consuming connections (MAILFERRY_BROKER_HEARTBEAT)


def connect(url: str, heartbeat: float = 0) -> Connection:
    """A connection with publisher confirms. ``heartbeat`` seconds (0: off) is for consuming
    connections, whose thread calls ``heartbeat_check`` every poll; a publishing connection sits
    idle between publishes with nobody to answer heartbeats, so it keeps them off (a dead peer
    is noticed on its next write, and the publish is retried on a new connection)."""
    return Connection(url, heartbeat=heartbeat, transport_options={"confirm_publish": True},
                      connect_timeout=10)


@dataclass(frozen=True)
class Outgoing:
    """One message of :meth:`Publisher.publish_batch`, as :meth:`Publisher.publish_raw` takes it."""

    body: bytes
    exchange: str
    routing_key: str
    type_: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = messages.JSON_CONTENT_TYPE


def outgoing(message: messages.AnyMessage) -> Outgoing:
    """A message as published: commands to the commands exchange, events to the events one."""
    exchange = topology.COMMANDS if isinstance(message, messages.COMMANDS) else topology.EVENTS
    return Outgoing(messages.encode(message), exchange=exchange.name,
                    routing_key=message.routing_key, type_=message.type,
                    headers={"schema-version": message.version},
                    content_type=messages.content_type(message))


class Publisher:
    """Publishes mailferry messages with confirms; reconnects on its own. Thread-safe: one
    publish at a time, so that two threads never read each other's confirms off the socket."""

    def __init__(self, url: str, retry_delays: Sequence[float]) -> None:
        self._lock = threading.RLock()
        self._url = url
        self._retry_delays = tuple(retry_delays)
        self._conn: Connection | None = None
        self._producer: Producer | None = None
        self._returned: str | None = None
        # the channel's publisher confirms: delivery tags count the channel's publishes from 1
        self._sent = 0
        self._unconfirmed: set[int] = set()
        self._nacked = False

    def _ensure(self) -> Producer:
        """The producer, connecting once if needed (no retries here: see ``_publish_raw``)."""
        if self._producer is None or self._conn is None or not self._conn.connected:
            self.close()
            conn = connect(self._url)
            try:
                conn.connect()
                topology.declare(conn.default_channel, self._retry_delays)
            except BaseException:
                conn.release()
                raise
            self._conn = conn
            self._producer = Producer(conn.default_channel, on_return=self._on_return)
            self._sent, self._unconfirmed, self._nacked = 0, set(), False
            channel: Any = conn.default_channel  # py-amqp's, with its confirm events
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
        return self._producer

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > delivery_tag}
        else:
            self._unconfirmed.discard(delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked = True

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str,
                   message: Any) -> None:
        self._returned = f"{exchange or '(default)'} / {routing_key}: {exc}"

    def publish(self, message: messages.AnyMessage) -> None:
        out = outgoing(message)
        self.publish_raw(out.body, exchange=out.exchange, routing_key=out.routing_key,
                         type_=out.type_, headers=out.headers, content_type=out.content_type)

    def publish_many(self, batch: Sequence[messages.AnyMessage]) -> None:
        """:meth:`publish` for many messages, with one wait for all their confirms
        (:meth:`publish_batch`: no retry; on failure, which of them RabbitMQ took is unknown)."""
        self.publish_batch([outgoing(m) for m in batch])

    def publish_raw(
        self,
        body: bytes | str,
        *,
        exchange: str,
        routing_key: str,
        type_: str | None,
        headers: dict[str, Any] | None = None,
        content_type: str | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish ``body`` as it is; ``content_type`` defaults to JSON (a republished message
        passes its own, so a blobs body stays one). ``mandatory=False`` only where nobody
        listening is normal (real-time notifications to people who are offline)."""
        with self._lock:
            self._publish_raw(body, exchange, routing_key, type_, headers,
                              content_type or messages.JSON_CONTENT_TYPE, mandatory)

    def _publish_raw(self, body: bytes | str, exchange: str, routing_key: str,
                     type_: str | None, headers: dict[str, Any] | None,
                     content_type: str, mandatory: bool) -> None:
        # "binary": the consumer's AMQP library leaves the body as bytes instead of trying to
        # decode it as text (which would copy it, or mangle it).
        encoding = "utf-8" if content_type == messages.JSON_CONTENT_TYPE else "binary"
        failure: BaseException | None = None
        for delay in PUBLISH_ATTEMPTS:
            if delay:
                time.sleep(delay)
            recoverable: tuple[type[BaseException], ...] = (
                OSError, OperationalError, *_transport_errors(self._conn))
            try:
                producer = self._ensure()
                assert self._conn is not None
                self._returned = None
                self._sent += 1
                producer.publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    type=type_ or "",
                    headers=headers or {},
                    content_type=content_type,
                    content_encoding=encoding,
                    delivery_mode=2,
                    mandatory=mandatory,
                    retry=False,
                )
            except recoverable as exc:
                self.close()
                failure = exc
                log.warning("broker.publish_retrying", error=_one_line(exc), wait=delay)
                continue
            if self._returned is not None:
                raise Unroutable(f"no queue takes {type_ or 'the message'} at {self._returned}")
            return
        raise BrokerUnavailable(f"publish to RabbitMQ failed: {failure}") from failure

    def publish_batch(self, batch: Sequence[Outgoing], *, mandatory: bool = True,
                      confirm_timeout: float = 30.0) -> None:
        """Publish ``batch`` in order on one channel, then wait until RabbitMQ confirmed every
        message: one wait for the batch instead of one per message. No retry here: a nack, a
        return (``mandatory``), a broken connection or confirms later than ``confirm_timeout``
        raise :class:`BrokerUnavailable` (or :class:`Unroutable`), and the caller publishes the
        whole batch again (at least once; one channel keeps the order)."""
        with self._lock:
            recoverable: tuple[type[BaseException], ...] = (
                OSError, OperationalError, *_transport_errors(self._conn))
            try:
                producer = self._ensure()
                assert self._conn is not None
                recoverable = (OSError, OperationalError, *_transport_errors(self._conn))
                channel = producer.channel
                if not channel._confirm_selected:  # py-amqp selects it on its first publish
                    channel._confirm_selected = True
                    channel.confirm_select()
                self._returned, self._nacked = None, False
                for item in batch:
                    encoding = ("utf-8" if item.content_type == messages.JSON_CONTENT_TYPE
                                else "binary")
                    message = channel.prepare_message(
                        item.body, None, item.content_type, encoding, item.headers,
                        {"delivery_mode": 2, "type": item.type_ or ""})
                    self._sent += 1
                    self._unconfirmed.add(self._sent)
                    # py-amqp's basic_publish waits for each confirm; _basic_publish does not
                    channel._basic_publish(message, exchange=item.exchange,
                                           routing_key=item.routing_key, mandatory=mandatory)
                deadline = time.monotonic() + confirm_timeout
                while self._unconfirmed and not self._nacked:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{len(self._unconfirmed)} confirms still missing")
                    with contextlib.suppress(TimeoutError):
                        self._conn.drain_events(timeout=left)
            except recoverable as exc:
                self.close()
                raise BrokerUnavailable(f"batch publish to RabbitMQ failed: {exc}") from exc
            if self._nacked:
                self.close()
                raise BrokerUnavailable("RabbitMQ refused (nacked) a message of the batch")
            if self._returned is not None:
                raise Unroutable(f"no queue takes a message of the batch at {self._returned}")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):  # already gone: nothing left to release
                    self._conn.release()
            self._conn = None
            self._producer = None


class PublisherPool:
    """One :class:`Publisher` (one connection) per thread, for handlers that publish from several
    threads at once: each waits only for its own confirms, never behind another thread's."""

    def __init__(self, url: str, retry_delays: Sequence[float]) -> None:
        self._url = url
        self._retry_delays = tuple(retry_delays)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Publisher] = []

    def _mine(self) -> Publisher:
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        if publisher is None:
            publisher = Publisher(self._url, self._retry_delays)
            self._local.publisher = publisher
            with self._lock:
                self._all.append(publisher)
        return publisher

    def publish(self, message: messages.AnyMessage) -> None:
        self._mine().publish(message)

    def publish_raw(self, body: bytes | str, **kwargs: Any) -> None:
        self._mine().publish_raw(body, **kwargs)

    def close(self) -> None:
        with self._lock:
            for publisher in self._all:
                publisher.close()


def _transport_errors(conn: Connection | None) -> tuple[type[BaseException], ...]:
    if conn is None:
        return ()
    return (*conn.connection_errors, *conn.channel_errors)


Handler = Callable[[Any], None]
Handlers = Mapping[type, Handler]
RetryExhausted = Callable[[messages.AnyMessage, BaseException], None]


class Worker(ConsumerMixin):
    """Consumes one work queue and hands each message to ``handler``; see the module docstring.

    The consuming thread (the one calling :meth:`run`) owns the connection and its channel: it
    receives deliveries, submits each to a pool of ``concurrency`` handler threads, acks what they
    finished, and calls ``heartbeat_check`` at least every ``POLL`` seconds. The broker's
    prefetch is at least ``concurrency``, so every thread has work while the queue has some."""

    POLL = 1.0  # seconds the consuming thread waits for a delivery when no handler is running
    BUSY_POLL = 0.02  # ... and while handlers run: how soon a finished one is acked

    def __init__(
        self,
        *,
        url: str,
        work: topology.WorkQueue,
        handlers: Handlers,
        publisher: Publisher | PublisherPool,
        retry_delays: Sequence[float],
        prefetch: int = 1,
        concurrency: int = 1,
        heartbeat: float = HEARTBEAT,
        on_retry_exhausted: RetryExhausted | None = None,
        on_tick: Callable[[], None] | None = None,
        tick_seconds: float = 15.0,
    ) -> None:
        self.on_tick = on_tick
        self.tick_seconds = tick_seconds
        self._next_tick = 0.0
        self.connection = connect(url, heartbeat=heartbeat)
        self.on_retry_exhausted = on_retry_exhausted
        self.work = work
        # at zero from the start: Prometheus's increase() misses a series' first count
        metrics.DEAD_LETTERED.labels(work.name)
        self.handlers = dict(handlers)
        self.publisher = publisher
        self.retry_delays = tuple(retry_delays)
        self.concurrency = max(1, concurrency)
        self.prefetch = max(prefetch, self.concurrency)
        self._base_context = structlog.contextvars.get_contextvars()  # e.g. the service name
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency,
                                        thread_name_prefix=f"{work.name}-handler")
        # Deliveries handed to the pool and not yet settled, and what the pool finished:
        # (delivery, "ack" | "requeue"), settled on the consuming thread only.
        self._in_flight: dict[Future[None], Message] = {}
        self._done: queue.SimpleQueue[tuple[Message, str]] = queue.SimpleQueue()
        self._tick: Future[None] | None = None

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Consumer]:
        topology.declare(channel, self.retry_delays)
        return [
            consumer_cls(
                queues=[self.work.queue()],
                on_message=self.on_message,
                prefetch_count=self.prefetch,
                no_ack=False,
            )
        ]

    def run(self, _tokens: int = 1, **kwargs: Any) -> None:
        try:
            super().run(_tokens, **kwargs)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def consume(self, limit: int | None = None, timeout: float | None = None,
                safety_interval: float = 1, **kwargs: Any) -> Iterator[None]:
        """kombu's loop, plus: settle what the handler threads finished, keep heartbeats going
        while they work, and on stop wait for the handlers in hand (prefetched deliveries that
        no thread started go back to the queue when the connection closes)."""
        with self.consumer_context(**kwargs) as (conn, _channel, consumers):
            stopping = False
            while True:
                self._settle()
                if self.should_stop and not stopping:
                    stopping = True
                    for consumer in consumers:  # no new deliveries
                        with contextlib.suppress(*_transport_errors(conn), OSError):
                            consumer.cancel()
                    for future in [f for f in self._in_flight if f.cancel()]:
                        self._in_flight.pop(future)  # never started: the broker gets it back
                if stopping and not self._in_flight:
                    break
                if not stopping:
                    self.on_iteration()
                try:
                    conn.drain_events(timeout=self.BUSY_POLL if self._in_flight else self.POLL)
                except TimeoutError:
                    pass
                except OSError:
                    if not self.should_stop:
                        raise
                    time.sleep(self.BUSY_POLL)  # lost while stopping: wait for the handlers
                    continue
                conn.heartbeat_check()
                yield

    def on_iteration(self) -> None:
        """Called by the consume loop at least once a second: queues ``on_tick`` on its
        schedule, on the handler threads (with ``concurrency`` 1, never at the same time as a
        handler)."""
        if self.on_tick is None or time.monotonic() < self._next_tick:
            return
        if self._tick is not None and not self._tick.done():
            return
        self._next_tick = time.monotonic() + self.tick_seconds
        self._tick = self._pool.submit(self._run_tick)

    def _run_tick(self) -> None:
        assert self.on_tick is not None
        try:
            self.on_tick()
        except Exception:
            log.exception("worker.tick_failed")

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        log.warning("broker.connection_lost", error=str(exc), retry_in=interval)

    def on_message(self, message: Message) -> None:
        """On the consuming thread: hand the delivery to a handler thread (none once stopping:
        it stays unacked and goes back to the queue when the connection closes)."""
        if self.should_stop:
            return
        future = self._pool.submit(self._process, message)
        self._in_flight[future] = message

    def _settle(self) -> None:
        """On the consuming thread: ack (or reject back) what the handler threads finished. A
        delivery of a connection that was lost since is not acked (its channel is gone and the
        broker has put it back in the queue already)."""
        # Finished futures first, then their outcomes: a thread queues its outcome before its
        # future is done, so none of the futures dropped here leaves its delivery unsettled.
        for future in [f for f in self._in_flight if f.done()]:
            self._in_flight.pop(future)
        while True:
            try:
                message, outcome = self._done.get_nowait()
            except queue.Empty:
                break
            try:
                if outcome == "ack":
                    message.ack()
                else:
                    message.requeue()
            except Exception as exc:
                log.warning("message.not_settled", outcome=outcome, error=_one_line(exc),
                            type=message.properties.get("type"))

    def _process(self, message: Message) -> None:
        """On a handler thread: the message's whole fate but the ack itself."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**self._base_context)
        try:
            self._handle(message)
        except Exception as exc:  # even the republish failed: back to the queue, counted
            log.error("message.requeued", type=message.properties.get("type"),
                      error=f"{type(exc).__name__}: {_one_line(exc)}")
            self._done.put((message, "requeue"))
        else:
            self._done.put((message, "ack"))

    def _handle(self, message: Message) -> None:
        attempt = _attempt(message)
        if attempt is None:
            shown = _one_line(ValueError(repr((message.headers or {}).get(ATTEMPT_HEADER))))
            self._dead_letter(message, f"unreadable header {ATTEMPT_HEADER}: {shown}", 0)
            return
        try:
            decoded = messages.decode(message.body)
        except (ValidationError, messages.MalformedMessage) as exc:
            self._dead_letter(message, f"malformed message: {_one_line(exc)}", attempt)
            return
        except MemoryError:
            raise  # not the body's fault: redelivered
        except Exception as exc:  # a body no codec path foresaw: still never a consumer crash
            self._dead_letter(message, f"malformed message: {type(exc).__name__}: "
                                       f"{_one_line(exc)}", attempt)
            return
        handler = self.handlers.get(type(decoded))
        if handler is None:
            self._dead_letter(message, f"no handler for {decoded.type} on {self.work.name}",
                              attempt)
            return
        try:
            handler(decoded)
        except PermanentError as exc:
            self._dead_letter(message, f"{type(exc).__name__}: {_one_line(exc)}", attempt,
                              decoded, exc)
        except Postponed as exc:
            self._postpone(message, exc, attempt)
        except Exception as exc:
            log.exception("message.failed", type=decoded.type, attempt=attempt)
            self._retry(message, exc, attempt, decoded)

    def _retry(self, message: Message, exc: Exception, attempt: int,
               decoded: messages.AnyMessage) -> None:
        reason = f"{type(exc).__name__}: {_one_line(exc)}"
        if attempt >= len(self.retry_delays):
            self._dead_letter(message, f"retries exhausted; last error: {reason}", attempt,
                              decoded, exc)
            return
        delay = retry_delay(self.retry_delays, attempt, exc)
        self._delay(message, delay, attempt + 1, reason)
        log.warning("message.retry_scheduled", type=message.properties.get("type"),
                    attempt=attempt + 1, delay=delay, error=reason)

    def _postpone(self, message: Message, exc: Postponed, attempt: int) -> None:
        delay = retry_delay(self.retry_delays, 0, exc)
        reason = f"{type(exc).__name__}: {_one_line(exc)}"
        self._delay(message, delay, attempt, reason)  # the attempt count unchanged
        log.info("message.postponed", type=message.properties.get("type"), delay=delay,
                 reason=reason)

    def _delay(self, message: Message, delay: float, attempt: int, reason: str) -> None:
        """Through the retry queue of ``delay`` back to the work queue, as try ``attempt``."""
        self.publisher.publish_raw(
            message.body,
            exchange=topology.DEFAULT.name,
            routing_key=self.work.retry_name(delay),
            type_=message.properties.get("type"),
            headers={**_own_headers(message), ATTEMPT_HEADER: attempt, ERROR_HEADER: reason},
            content_type=message.content_type,
        )

    def _dead_letter(self, message: Message, reason: str, attempt: int,
                     decoded: messages.AnyMessage | None = None,
                     exc: BaseException | None = None) -> None:
        if decoded is not None and exc is not None and self.on_retry_exhausted is not None:
            try:
                self.on_retry_exhausted(decoded, exc)
            except Exception:  # reporting must not stop the message reaching the dead letters
                log.exception("dead_letter.hook_failed")
        self.publisher.publish_raw(
            message.body,
            exchange=topology.DEAD_LETTER.name,
            routing_key=self.work.name,
            type_=message.properties.get("type"),
            headers={
                **_own_headers(message),
                ATTEMPT_HEADER: attempt,
                ERROR_HEADER: reason[:2000],
                "x-mailferry-failed-at": datetime.now(UTC).isoformat(),
            },
            content_type=message.content_type,
        )
        metrics.DEAD_LETTERED.labels(self.work.name).inc()
        log.error("message.dead_lettered", type=message.properties.get("type"), reason=reason)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the messages in hand, then stop (nothing half-applied)."""

        def stop(signum: int, _frame: object) -> None:
            log.info("worker.stopping", signal=signal.Signals(signum).name)
            self.should_stop = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def retry_delay(delays: Sequence[float], attempt: int, exc: BaseException) -> float:
    """How long retry number ``attempt + 1`` waits: ``delays[attempt]``, unless the failure is a
    ``TransientError`` whose ``retry_after`` asks for longer (a token endpoint's 429 with
    ``Retry-After``): then the shortest configured delay that is at least that long, capped at
    the longest (a retry waits in a queue with a fixed TTL, one per configured delay)."""
    delay = delays[attempt]
    wanted = exc.retry_after if isinstance(exc, TransientError) else None
    if wanted is None or wanted <= delay:
        return delay
    return min((d for d in delays if d >= wanted), default=max(delays))


def _attempt(message: Message) -> int | None:
    """The delivery's try number from our header; None when it is not one (a hand-published
    message may carry anything there)."""
    value = (message.headers or {}).get(ATTEMPT_HEADER, 0)
    if isinstance(value, bool) or not isinstance(value, int | str | bytes):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number <= MAX_ATTEMPT else None


def _own_headers(message: Message) -> dict[str, Any]:
    """Our headers, without the broker's x-death bookkeeping (it grows with each hop)."""
    return {k: v for k, v in (message.headers or {}).items()
            if not k.startswith(("x-death", "x-first-death", "x-last-death", "x-delivery-count"))}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] or type(exc).__name__
