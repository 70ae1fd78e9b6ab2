"""The persister's CPU per message, offline: the handler alone, without broker, fetcher or threads.

Generated mail (the corpus of ``initial_sync.py``, same seed) is cut into MessagesFetched events
of 500, encoded and decoded as on the broker, and stored by ``handle`` into a private database,
one mailbox per variant:

- ``first sync``: no checkpoint, so the mail is stored with its raw bytes only (the parse is
  left for the parse step, issue 11's "parse off the critical path");
- ``parse step``: that step afterwards (``shared.parsing.parse_pending``), to the last message;
- ``new mail``: the same events above a checkpoint, parsed as they are stored (what every
  message cost before the parse step existed).

Process CPU time (``time.process_time``), so the machine's other load counts less than in wall
time, but contention still inflates it: report the load with the figures.

    .venv/bin/python bench/persister_cpu.py [--messages 3000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
import uuid
from datetime import UTC, datetime

from mailferry import db, messages, parsing
from mailferry.devkit import mail, services
from mailferry.messages import FetchedMessage, MessagesFetched
from mailferry.services.persister.handlers import PersisterDeps, handle

BATCH = 500


def _events(mailbox_id: int, corpus: list[tuple[bytes, datetime]]) -> list[bytes]:
    run_id = uuid.uuid4()
    out = []
    for no, start in enumerate(range(0, len(corpus), BATCH)):
        batch = tuple(FetchedMessage(uid=start + i + 1, internal_date=when, size=len(raw), raw=raw)
                      for i, (raw, when) in enumerate(corpus[start:start + BATCH]))
        out.append(messages.encode(MessagesFetched(
            run_id=run_id, mailbox_id=mailbox_id, lease_token=1, folder="INBOX", uidvalidity=1,
            batch_no=no, messages=batch)))
    return out


def postgres_cpu() -> float:
    """CPU seconds of every PostgreSQL process on the machine (backends, WAL writer, checkpointer,
    autovacuum): the database's side of the work, which the handler's process CPU leaves out.
    Machine-wide: run it on a quiet machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        name, rest = stat[stat.index(b"(") + 1:stat.rindex(b")")], stat[stat.rindex(b")") + 2:]
        if name == b"postgres":
            fields = rest.split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _run(bodies: list[bytes], deps: PersisterDeps) -> tuple[float, float]:
    started, database = time.process_time(), postgres_cpu()
    for body in bodies:
        handle(messages.decode(body), deps)  # type: ignore[arg-type]
    return time.process_time() - started, postgres_cpu() - database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--profile", action="store_true", help="cProfile the first-sync path")
    args = parser.parse_args()
    factory = mail.MessageFactory(1, datetime.now(UTC))
    corpus = [(raw, when) for raw, when, _ in mail.generate(factory, args.messages, mail.Written())]
    size = sum(len(raw) for raw, _ in corpus)
    print(f"{len(corpus)} messages, {size / 1e6:.1f} MB; load {os.getloadavg()[0]:.1f}")
    with services.private_database() as url:
        db.migrate(url)
        deps = PersisterDeps(connection=db.Reconnecting(url))
        with db.connect(url, autocommit=True) as conn:
            first = services.mailbox_row(conn, name="first")
            new = services.mailbox_row(conn, name="new")
            conn.execute("""INSERT INTO folders (mailbox_id, name, raw_name, sync_enabled,
                                                 uidvalidity, last_uid)
                            VALUES (%s, 'INBOX', 'INBOX', true, 1, 0)""", (new,))
            for name, mailbox_id in (("first sync", first), ("new mail", new)):
                bodies = _events(mailbox_id, corpus)
                profile = cProfile.Profile() if args.profile and name == "first sync" else None
                if profile:
                    profile.enable()
                seconds, database = _run(bodies, deps)
                if profile:
                    profile.disable()
                    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
                print(f"{name:12} {1000 * seconds / len(corpus):.3f} ms CPU per message, "
                      f"PostgreSQL {1000 * database / len(corpus):.3f} ms")
                if name == "first sync":
                    started = time.process_time()
                    while parsing.parse_pending(conn):
                        pass
                    seconds = time.process_time() - started
                    print(f"{'parse step':12} {1000 * seconds / len(corpus):.3f} ms CPU per message")
        deps.connection().close()


if __name__ == "__main__":
    main()
