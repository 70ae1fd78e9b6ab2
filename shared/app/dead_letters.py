"""Dead-lettered messages: read them with their reason, or send them back for another try.

Listing takes messages off a dead-letter queue unacknowledged and closes the channel, so every
one goes back where it was; replaying acknowledges a message only after the broker confirmed
its copy on the work queue, so a crash in between duplicates (harmless: handlers are idempotent)
and never loses it.
"""

from __future__ import annotations

import json
from typing import Any

from mailferry import broker, topology
from mailferry.errors import InvalidInput
from mailferry.messages import split_body


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
    """One dead letter for a person: whatever its body (a JSON list or scalar, nesting deeper
    than the parser goes, bytes that are not UTF-8) and headers, never an exception."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    raw_body = message.body if isinstance(message.body, bytes | str) else b""
    json_part, raw_bytes = split_body(raw_body)
    try:
        parsed = json.loads(json_part)
    except (ValueError, TypeError, RecursionError):
        parsed = None
    body = parsed if isinstance(parsed, dict) else {}
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    text = json_part.decode("utf-8", "replace") if isinstance(json_part, bytes) else json_part
    return {
        "queue": queue,
        "type": _text(message.properties.get("type") or body.get("type")),
        "mailbox_id": _text(body.get("mailbox_id")),
        "run_id": _text(body.get("run_id")),
        "error": _text(headers.get("x-mailferry-error")) or f"broker: {_text(death.get('reason')) or '?'}",
        "failed_at": _text(headers.get("x-mailferry-failed-at")),
        "attempts": _text(headers.get("x-mailferry-attempt")),
        "size": len(raw_body),
        # a MessagesFetched body: its JSON part (what a person reads), then the mail itself
        "json": _cut(text, 4096),
        "note": f"+ {raw_bytes} bytes of raw messages" if raw_bytes else "",
    }


def _text(value: object) -> Any:
    """A value for a table cell: numbers and strings as they are, anything else as its (short)
    repr, since a hand-published message can put any AMQP or JSON value there."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return _cut(repr(value), 200)
