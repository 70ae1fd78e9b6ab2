"""The change stream, read back: live from RabbitMQ (``tail``) or from PostgreSQL (``list``).

``tail`` binds an exclusive, auto-deleted queue of its own to ``mailferry.changes``: it sees
what is published while it runs and leaves nothing behind. An application that must not miss a
change binds a durable queue of its own instead (``examples/consume_changes.py``) and, after
being away longer than the queue lived, catches up with :func:`list_changes`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kombu.entity import Queue
from kombu.messaging import Consumer
from kombu.transport.base import Message

from mailferry import broker, db, outbox, topology
from mailferry.errors import InvalidInput, NotFound


def list_changes(conn: db.Connection, since: int, mailbox_id: int | None = None,
                 limit: int = 1000) -> list[dict[str, Any]]:
    """Change events with a sequence number above ``since`` (each mailbox's own numbering),
    per mailbox in order, as they were published; kept MAILFERRY_CHANGES_RETENTION seconds."""
    if since < 0:
        raise InvalidInput("--since must be 0 or more")
    if mailbox_id is not None and conn.execute(
            "SELECT 1 FROM mailboxes WHERE id = %s", (mailbox_id,)).fetchone() is None:
        raise NotFound(f"no mailbox with id {mailbox_id}")
    return outbox.since(conn, since, mailbox_id, limit)


def tail(broker_url: str, on_change: Callable[[dict[str, Any]], None],
         mailbox_id: int | None = None, stop: Callable[[], bool] = lambda: False,
         on_ready: Callable[[], None] | None = None) -> None:
    """Call ``on_change`` with each change event published from now on (of one mailbox, or of
    all), until ``stop()`` is true (checked every second) or the caller is interrupted."""
    queue = Queue(f"mailferry.cli.changes-tail.{uuid.uuid4().hex[:8]}",
                  exchange=topology.CHANGES, routing_key=topology.changes_binding(mailbox_id),
                  exclusive=True, auto_delete=True, durable=False)

    def received(body: Any, message: Message) -> None:
        on_change(body if isinstance(body, dict) else message.decode())

    with broker.connect(broker_url) as conn:
        channel = conn.channel()
        topology.CHANGES(channel).declare()
        with Consumer(channel, queues=[queue], callbacks=[received], no_ack=True,
                      accept=["json"]):
            if on_ready is not None:
                on_ready()
            while not stop():
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    continue
