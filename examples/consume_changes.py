"""Print new mail as mailferry stores it: an integrator's consumer of the change stream.

It uses pika and the documented message formats only (README "Consuming changes",
docs/schemas/changes/): no mailferry import, as an application in any language would.

    pip install pika
    python examples/consume_changes.py --url amqp://guest:guest@localhost:5672/%2F [--mailbox 1]

What it shows:
- a durable queue of its own (``--queue``), bound to the ``mailferry.changes`` topic exchange
  with ``mailbox.<id>.message_stored`` (``mailbox.*.message_stored`` for every mailbox): changes
  published while it is stopped wait there;
- ``backfill: true`` is old mail (a first sync, a re-scan) and ``known: true`` mail the mailbox
  already held (a move or copy between folders): neither is new mail;
- delivery is at least once: the same change may come twice, with the same ``id``; keep the ids
  you handled (here in memory; in your database in real life) and skip repeats;
- acknowledge after handling, so a crash redelivers rather than loses.
"""

from __future__ import annotations

import argparse
import json
import sys

import pika

EXCHANGE = "mailferry.changes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@localhost:5672/%2F")
    parser.add_argument("--queue", default="example.new-mail")
    parser.add_argument("--mailbox", help="one mailbox's id (default: every mailbox)")
    args = parser.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(args.queue, durable=True)
    channel.queue_bind(args.queue, EXCHANGE, routing_key=f"mailbox.{args.mailbox or '*'}.message_stored")
    channel.basic_qos(prefetch_count=100)
    seen: set[str] = set()

    def on_message(ch: pika.adapters.blocking_connection.BlockingChannel,
                   method: pika.spec.Basic.Deliver, properties: pika.spec.BasicProperties,
                   body: bytes) -> None:
        change = json.loads(body)
        if change["id"] not in seen and not change["backfill"] and not change["known"]:
            print(f"new mail in mailbox {change['mailbox_id']}, {change['folder']}: "
                  f"{json.dumps(change['subject'], ensure_ascii=False)} from {change['from']} "
                  f"(uid {change['uid']}, message {change['message_ref']}, id {change['id']})",
                  flush=True)
        seen.add(change["id"])
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(args.queue, on_message)
    print(f"waiting for new mail on queue {args.queue}", file=sys.stderr, flush=True)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        channel.stop_consuming()
    connection.close()


if __name__ == "__main__":
    main()
