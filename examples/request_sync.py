"""Ask mailferry to sync a mailbox now, as a third-party application would: publish a
SyncMailbox command to RabbitMQ.

It uses pika and the documented message format only (README "Message formats",
docs/schemas/commands/SyncMailbox.json): no mailferry import.

    pip install pika
    python examples/request_sync.py --url amqp://guest:guest@localhost:5672/%2F --mailbox 1

The command goes to the direct exchange ``mailferry.commands`` with routing key
``sync-mailbox``, as a persistent JSON message whose AMQP ``type`` property is ``SyncMailbox``
and header ``schema-version`` is 1. Publisher confirms and ``mandatory`` make sure RabbitMQ took
it (mailferry must be installed on that vhost: its queue must exist). The run id is yours to
choose (a new UUID); follow the run with ``mailferry status`` or in the ``sync_runs`` table. A
mailbox that already has a run queued or running is not synced twice: the command is dropped.
"""

from __future__ import annotations

import argparse
import json
import uuid

import pika


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@localhost:5672/%2F")
    parser.add_argument("--mailbox", type=int, required=True)
    parser.add_argument("--force", action="store_true",
                        help="re-scan each folder's first-sync window, not only new UIDs")
    args = parser.parse_args()

    command = {"type": "SyncMailbox", "version": 1, "run_id": str(uuid.uuid4()),
               "mailbox_id": args.mailbox, "force": args.force, "requested_by": "example-app"}
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        exchange="mailferry.commands",
        routing_key="sync-mailbox",
        body=json.dumps(command).encode(),
        properties=pika.BasicProperties(
            content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent,
            type="SyncMailbox", headers={"schema-version": 1}),
        mandatory=True,  # raises pika.exceptions.UnroutableError if no queue takes it
    )
    connection.close()
    print(json.dumps({"run_id": command["run_id"], "mailbox_id": args.mailbox}))


if __name__ == "__main__":
    main()
