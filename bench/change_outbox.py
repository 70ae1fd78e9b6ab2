"""What the change outbox costs the persister: a first sync's MessagesFetched batches applied
through the persister's handler, timing the outbox's calls (the snapshot before, the changes
after, the numbered insert) against the whole transaction, in the same run.

    .venv/bin/python bench/change_outbox.py [--batches 10] [--batch 500]

A report, not a test: it prints figures and one JSON line; it fails only on a wrong result (not
one MessageStored per message).
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mailferry import db, outbox, runs
from mailferry.devkit import mail, services
from mailferry.messages import FetchedMessage, MessagesFetched
from mailferry.services.persister import handlers

spent: dict[str, float] = defaultdict(float)


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    for name in ("messages_before", "message_changes", "append"):
        setattr(outbox, name, timed(name, getattr(outbox, name)))
    rng = random.Random(1)
    now = datetime.now(UTC)
    with services.private_database() as url:
        db.migrate(url)
        deps = handlers.PersisterDeps(connection=db.Reconnecting(url))
        conn = deps.connection()
        mailbox_id = services.mailbox_row(conn)
        run_id = uuid.uuid4()
        runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False,
                     requested_by="bench", run_id=run_id)
        events = []
        for b in range(args.batches):
            messages = []
            for i in range(args.batch):
                raw = mail.plain_message(b * args.batch + i, rng, rng.randint(1500, 4500))
                messages.append(FetchedMessage(uid=b * args.batch + i + 1, size=len(raw), raw=raw,
                                               internal_date=now))
            events.append(MessagesFetched(run_id=run_id, mailbox_id=mailbox_id, lease_token=1,
                                          folder="INBOX", uidvalidity=1, batch_no=b,
                                          messages=tuple(messages)))
        started = time.perf_counter()
        for event in events:
            handlers.handle(event, deps)
        total = time.perf_counter() - started
        stored = conn.execute("SELECT count(*) AS n FROM change_outbox WHERE type = "
                              "'MessageStored'").fetchone()
        conn.close()
    n = args.batches * args.batch
    in_outbox = sum(spent.values())
    print(f"{n} messages in {args.batches} batches: {total:.2f} s in the handler "
          f"({n / total:.0f} msg/s, MIME parsing included)")
    for name, seconds in spent.items():
        print(f"  outbox.{name}: {seconds:.3f} s")
    print(f"  outbox in all: {in_outbox:.2f} s, {100 * in_outbox / total:.1f} % of the handler")
    print(json.dumps({"messages": n, "handler_seconds": round(total, 3),
                      "outbox_seconds": round(in_outbox, 3),
                      "outbox_share": round(in_outbox / total, 4),
                      **{k: round(v, 3) for k, v in spent.items()}}))
    if stored is None or stored["n"] != n:
        raise SystemExit(f"expected {n} MessageStored, found {stored}")


if __name__ == "__main__":
    main()
