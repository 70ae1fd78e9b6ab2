"""Every exchange, queue, binding, retry queue and dead-letter queue of mailferry, in one place.

Names say who consumes what, so the management UI reads like the design:

    mailferry.commands (direct)  --sync-mailbox, sync-folders, continue-sync-->
                                                      mailferry.fetcher.sync-mailbox
    mailferry.events   (topic)   --sync.# folders.# folder.# messages.#-->  mailferry.persister.events
                                 --credentials.#-->  mailferry.notifier.credentials
    mailferry.changes  (topic)   --mailbox.<id>.<event>-->  queues of other applications

Each work queue is a durable quorum queue with
- ``<queue>.dead-letter``: where a message goes with its reason when it cannot be processed
  (our code publishes it there with an ``x-mailferry-error`` header; the broker itself sends it
  there after ``x-delivery-limit`` redeliveries, e.g. a message that crashes its consumer);
- ``<queue>.retry-<N>s``: one delay queue per backoff step; a message waits there for its TTL and
  is dead-lettered straight back to the work queue (no sleeping consumer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kombu.entity import Exchange, Queue

COMMANDS = Exchange("mailferry.commands", type="direct", durable=True)
EVENTS = Exchange("mailferry.events", type="topic", durable=True)
DEAD_LETTER = Exchange("mailferry.dead-letter", type="direct", durable=True)
DEFAULT = Exchange("", type="direct")  # routes by queue name: retries and replays
# Real-time notifications for people, routing key ``user.<user id>``: a browser subscribes to
# its own key through Web-STOMP (``/exchange/mailferry.notifications/user.42``, header
# ``x-queue-name: user-42-<tab>``); RabbitMQ permissions keep each person to queues named
# ``user-<id>-...`` and topic permissions to their own key (see the README).
NOTIFICATIONS = Exchange("mailferry.notifications", type="topic", durable=True)
# The change stream for integrators (shared/outbox.py, published by the persisters' relay):
# routing key ``mailbox.<mailbox id>.<event in snake case>`` (``mailbox.7.message_stored``).
# mailferry binds no queue to it: each consuming application binds its own.
CHANGES = Exchange("mailferry.changes", type="topic", durable=True)

DELIVERY_LIMIT = 10


@dataclass(frozen=True)
class WorkQueue:
    name: str
    exchange: Exchange
    routing_keys: tuple[str, ...]

    @property
    def dead_letter_name(self) -> str:
        return f"{self.name}.dead-letter"

    def retry_name(self, delay: float) -> str:
        return f"{self.name}.retry-{_delay_label(delay)}"

    def queue(self) -> Queue:
        args = {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD_LETTER.name,
            "x-dead-letter-routing-key": self.name,
            "x-delivery-limit": DELIVERY_LIMIT,
            # at-least-once dead-lettering needs reject-publish (RabbitMQ 3.10+)
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        return Queue(
            self.name,
            exchange=self.exchange,
            bindings=None,
            routing_key=self.routing_keys[0],
            durable=True,
            queue_arguments=args,
        )

    def dead_letter_queue(self) -> Queue:
        return Queue(
            self.dead_letter_name,
            exchange=DEAD_LETTER,
            routing_key=self.name,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        )

    def retry_queue(self, delay: float) -> Queue:
        return Queue(
            self.retry_name(delay),
            durable=True,
            queue_arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": int(delay * 1000),
                "x-dead-letter-exchange": DEFAULT.name,
                "x-dead-letter-routing-key": self.name,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )


FETCHER = WorkQueue("mailferry.fetcher.sync-mailbox", COMMANDS,
                    ("sync-mailbox", "sync-folders", "continue-sync"))
PERSISTER = WorkQueue(
    "mailferry.persister.events", EVENTS, ("sync.#", "folders.#", "folder.#", "messages.#")
)
NOTIFIER = WorkQueue("mailferry.notifier.credentials", EVENTS, ("credentials.#",))
WORK_QUEUES = (FETCHER, PERSISTER, NOTIFIER)


def declare(channel: Any, retry_delays: Sequence[float]) -> None:
    """Declare the whole topology (idempotent); every process does it before it publishes."""
    for exchange in (COMMANDS, EVENTS, DEAD_LETTER, NOTIFICATIONS, CHANGES):
        exchange(channel).declare()
    for work in WORK_QUEUES:
        queue = work.queue()(channel)
        queue.declare()
        for key in work.routing_keys:
            queue.bind_to(exchange=work.exchange, routing_key=key)
        work.dead_letter_queue()(channel).declare()
        for delay in retry_delays:
            work.retry_queue(delay)(channel).declare()


def changes_binding(mailbox_id: int | None = None, event: str = "#") -> str:
    """The binding key for one mailbox's changes (or every mailbox's); ``event`` in snake case,
    e.g. ``message_stored``."""
    return f"mailbox.{'*' if mailbox_id is None else mailbox_id}.{event}"


def user_routing_key(user_id: int) -> str:
    return f"user.{user_id}"


def _delay_label(delay: float) -> str:
    return f"{delay:g}".replace(".", "_") + "s"
