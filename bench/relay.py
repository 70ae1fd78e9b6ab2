"""How fast the change stream's relay empties the outbox: a confirm per row against one per batch.

The relay (services/persister/relay.py) publishes the ``change_outbox`` rows to
``mailferry.changes`` and marks them published once RabbitMQ confirmed them. It used to wait
for each row's confirm (a round trip each); it now publishes a batch on one channel and waits
once for all its confirms. The script fills the outbox of a private database with ``--rows``
MessageStored rows over ``--mailboxes`` mailboxes, binds a durable queue of the kind an
integrator would declare (quorum by default) to every change, and empties the outbox both ways,
in the same run: rows published one confirm at a time (what the relay did), then through
``publish_pending`` (what it does). After each way it checks that the queue holds every row,
each mailbox's in ``seq`` order.

    .venv/bin/python bench/relay.py [--rows 5000] [--mailboxes 20] [--queue-type quorum]

A report, not a test: it prints figures and one JSON line; it fails only on a wrong result.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from kombu import Connection, Queue

from mailferry import db, outbox, topology
from mailferry.broker import Publisher
from mailferry.devkit import services
from mailferry.messages import change_routing_key
from mailferry.services.persister.relay import BATCH, publish_pending

FILL = """
INSERT INTO change_outbox (event_id, mailbox_id, seq, type, payload)
SELECT gen_random_uuid(), m.id, g.n, 'MessageStored',
       jsonb_build_object(
           'type', 'MessageStored', 'version', 1, 'id', gen_random_uuid(), 'mailbox_id', m.id,
           'seq', g.n, 'occurred_at', now(), 'folder', 'INBOX', 'folder_id', m.id,
           'uidvalidity', 1, 'uid', g.n, 'message_ref', g.n * 1000 + m.id,
           'message_id', '<' || g.n || '.' || m.id || '@bench.example>',
           'subject', 'Quarterly figures for the north-east region, revised (' || g.n || ')',
           'from', 'Someone Somewhere <someone@bench.example>', 'date', now(),
           'internal_date', now(), 'flags', jsonb_build_array('\\Seen'), 'size', 6000 + g.n,
           'sha256', md5(g.n::text) || md5(m.id::text), 'skipped_reason', null,
           'backfill', true, 'known', false)
  FROM mailboxes m CROSS JOIN generate_series(1, %s) AS g(n)
 ORDER BY g.n, m.id"""


def one_confirm_per_row(conn: db.Connection, publisher: Publisher) -> int:
    """The relay before batching: each row published and confirmed on its own."""
    total = 0
    while rows := outbox.pending(conn, BATCH):
        for row in rows:
            payload = row["payload"]
            publisher.publish_raw(
                json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(),
                exchange=topology.CHANGES.name,
                routing_key=change_routing_key(row["mailbox_id"], row["type"]),
                type_=row["type"], headers={"schema-version": payload.get("version", 1)},
                mandatory=False)
        outbox.published(conn, [r["id"] for r in rows])
        total += len(rows)
    return total


def batched(conn: db.Connection, publisher: Publisher) -> int:
    total = 0
    while published := publish_pending(conn, publisher):
        total += published
    return total


def drain_in_order(amqp: Connection, queue: Queue, expected: int) -> None:
    """Every row arrived once, each mailbox's in seq order."""
    last: dict[int, int] = {}
    got = 0
    bound = queue(amqp.default_channel)
    while (message := bound.get(no_ack=True)) is not None:
        event: dict[str, Any] = json.loads(message.body)
        if event["seq"] <= last.get(event["mailbox_id"], 0):
            raise SystemExit(f"out of order: {event['mailbox_id']} {event['seq']} after "
                             f"{last[event['mailbox_id']]}")
        last[event["mailbox_id"]] = event["seq"]
        got += 1
    if got != expected:
        raise SystemExit(f"expected {expected} changes in the queue, found {got}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--mailboxes", type=int, default=20)
    parser.add_argument("--queue-type", default="quorum", choices=("quorum", "classic"))
    args = parser.parse_args()
    per_mailbox = max(1, args.rows // args.mailboxes)
    rows = per_mailbox * args.mailboxes
    results = {}
    with services.private_database() as url, services.private_vhost() as (_, broker), \
            db.connect(url, autocommit=True) as conn, Connection(broker) as amqp:
        db.migrate(url)
        for n in range(args.mailboxes):
            services.mailbox_row(conn, name=f"m{n}", username=f"u{n}")
        conn.execute(FILL, (per_mailbox,))
        publisher = Publisher(broker, (1.0,))
        publisher.publish_raw(b"{}", exchange=topology.CHANGES.name, routing_key="warm-up",
                              type_="WarmUp", mandatory=False)  # connect and declare first
        queue = Queue("bench.changes", exchange=topology.CHANGES, routing_key="#",
                      durable=True, queue_arguments={"x-queue-type": args.queue_type})
        queue(amqp.default_channel).declare()
        for name, empty in (("one confirm per row", one_confirm_per_row),
                            (f"one wait per batch of {BATCH}", batched)):
            conn.execute("UPDATE change_outbox SET published_at = NULL")
            started = time.perf_counter()
            published = empty(conn, publisher)
            seconds = time.perf_counter() - started
            if published != rows:
                raise SystemExit(f"{name}: published {published} of {rows}")
            drain_in_order(amqp, queue, rows)
            results[name] = seconds
            print(f"{name}: {rows} changes in {seconds:.2f} s ({rows / seconds:,.0f}/s)")
        publisher.close()
    before, after = results.values()
    print(json.dumps({"rows": rows, "mailboxes": args.mailboxes, "queue_type": args.queue_type,
                      "per_row_seconds": round(before, 3), "batched_seconds": round(after, 3),
                      "speedup": round(before / after, 1)}))


if __name__ == "__main__":
    main()
