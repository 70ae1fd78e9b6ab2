"""Dead-lettered messages: read them with their reason, or send them back for another try.

Listing takes messages off a dead-letter queue unacknowledged and closes the channel, so every
one goes back where it was; replaying acknowledges a message only after the broker confirmed
its copy on the work queue, so a crash in between duplicates (harmless: handlers are idempotent)
and never loses it.
"""

from __future__ import annotations

import json
from typing import Any

from shared import broker, topology
from shared.errors import InvalidInput
from shared.messages import split_body


def queues(name: str | None) -> list[topology.WorkQueue]:
    """The work queues named (by their own or their dead-letter queue's name); None: all."""
    works = [w for w in topology.WORK_QUEUES if name in (None, w.name, w.dead_letter_name)]
    if not works:
        known = ", ".join(w.name for w in topology.WORK_QUEUES)
        raise InvalidInput(f"unknown queue; one of: {known}")
    return works


def list_dead_letters(broker_url: str, queue: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
    """Up to ``limit`` messages per queue, described (queue, type, mailbox_id, run_id, error,
    failed_at, attempts, size, json, note); they stay where they are."""
    works = queues(queue)
    out: list[dict[str, Any]] = []
    with broker.connect(broker_url) as conn:
        for work in works:
            channel = conn.channel()
            for message in _drain(channel, work.dead_letter_name, limit):
                out.append(describe(work.name, message))
            channel.close()  # unacknowledged: every message goes back to its queue
    return out


def replay_dead_letters(broker_url: str, publisher: broker.Publisher, queue: str | None = None,
                        limit: int = 100) -> int:
    """Send up to ``limit`` messages per queue back to their work queue with a fresh retry
    budget (mailferry's ``x-`` headers dropped); returns how many."""
    works = queues(queue)
    replayed = 0
    with broker.connect(broker_url) as conn:
        for work in works:
            channel = conn.channel()
            for message in _drain(channel, work.dead_letter_name, limit):
                headers = {k: v for k, v in (message.headers or {}).items()
                           if not k.startswith("x-")}
                publisher.publish_raw(message.body, exchange="", routing_key=work.name,
                                      type_=message.properties.get("type"), headers=headers,
                                      content_type=message.properties.get("content_type"))
                channel.basic_ack(message.delivery_tag)  # only after the broker confirmed
                replayed += 1
            channel.close()
    return replayed


def _drain(channel: Any, queue: str, limit: int) -> list[Any]:
    out: list[Any] = []
    channel.basic_qos(0, limit, False)
    while len(out) < limit:
        message = channel.basic_get(queue, no_ack=False)
        if message is None:
            break
        out.append(message)
    return out


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def describe(queue: str, message: Any) -> dict[str, Any]:
    headers = message.headers or {}
    json_part, raw_bytes = split_body(message.body)
    try:
        body = json.loads(json_part)
    except (ValueError, TypeError):
        body = {}
    death = (headers.get("x-death") or [{}])[0]
    return {
        "queue": queue,
        "type": message.properties.get("type") or body.get("type"),
        "mailbox_id": body.get("mailbox_id") if isinstance(body, dict) else None,
        "run_id": body.get("run_id") if isinstance(body, dict) else None,
        "error": headers.get("x-mailferry-error") or f"broker: {death.get('reason', '?')}",
        "failed_at": headers.get("x-mailferry-failed-at"),
        "attempts": headers.get("x-mailferry-attempt"),
        "size": len(message.body),
        # a MessagesFetched body: its JSON part (what a person reads), then the mail itself
        "json": _cut(json_part.decode("utf-8", "replace") if isinstance(json_part, bytes)
                     else json_part, 4096),
        "note": f"+ {raw_bytes} bytes of raw messages" if raw_bytes else "",
    }
