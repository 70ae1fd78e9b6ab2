"""Benchmark: what the connection budgets add to every sync (issue 13, "Connection budgets").

Why this exists: every IMAP connection a fetcher or a watch opens first claims a slot in
PostgreSQL (``mailferry_claim_connection``: advisory locks, two counts, an insert) and deletes
it after logging out, so every sync pays two more round trips to the database. This measures
them on the deployment's own functions (``mailferry.slots``):

1. **one thread**: claim + release, one after the other, for one account (the cost per sync),
   with the services' ``synchronous_commit = off`` (``slots.prepare``) and, for comparison,
   without it (each statement then waits for its commit to reach the disk);
2. **8 threads, one account**: eight fetcher threads claiming the same account at once (budget
   10): they queue on the account's advisory lock;
3. **8 threads, 8 accounts**: the usual case, no shared lock;
4. **10,000 watches on one host**: the same, with 10,000 live watch slots of other accounts on
   the host, without and with a host limit (then every claim counts the host's slots).

A private database, no IMAP, no broker. Run it with ``.venv/bin/python bench/connection_slots.py``
(about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

from mailferry import db, slots
from mailferry.config import Settings
from mailferry.devkit import services
from mailferry.devkit.measure import machine

HOST = "imap.example.com"


def pairs(url: str, settings: Settings, count: int, threads: int,
          accounts: int, prepared: bool = True) -> dict[str, Any]:
    """``threads`` threads, each with its own connection, each doing ``count`` claim + release
    pairs; thread ``i`` uses account ``i % accounts``. Latency of one pair, in ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def work(index: int) -> None:
        mine: list[float] = []
        with db.connect(url, autocommit=True) as conn:
            if prepared:  # as the services' connections are (no wait for the WAL flush)
                slots.prepare(conn)
            barrier.wait()
            for _ in range(count):
                started = time.perf_counter()
                slot = slots.claim(conn, settings, holder=f"bench-{index}", mailbox_id=index,
                                   host=HOST, username=f"user{index % accounts}",
                                   purpose=slots.Purpose.SYNC, seconds=60)
                assert slot is not None
                slots.release(conn, slot)
                mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"pairs": len(latencies), "pairs_per_s": round(len(latencies) / seconds),
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="pairs per thread")
    parser.add_argument("--watches", type=int, default=10_000)
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": machine()}
    with services.private_database() as url:
        db.migrate(url)
        settings = Settings(database_url=url)
        report["one_thread_synchronous_commit"] = pairs(url, settings, args.count // 4, 1, 1,
                                                        prepared=False)
        report["one_thread"] = pairs(url, settings, args.count, 1, 1)
        report["8_threads_one_account"] = pairs(url, settings, args.count // 4, 8, 1)
        report["8_threads_8_accounts"] = pairs(url, settings, args.count // 4, 8, 8)
        with db.connect(url, autocommit=True) as conn:
            conn.execute(
                """INSERT INTO imap_connection_slots (host, account, purpose, mailbox_id, holder,
                                                     expires_at)
                   SELECT %s, 'watched' || i, 'watch', i, 'bench', now() + interval '1 hour'
                     FROM generate_series(1, %s) AS i""", (HOST, args.watches))
            conn.execute("ANALYZE imap_connection_slots")
        report["watches_on_host"] = args.watches
        report["one_thread_no_host_limit"] = pairs(url, settings, args.count, 1, 1)
        limited = settings.model_copy(update={"max_connections_per_host": args.watches * 2})
        report["one_thread_host_limit"] = pairs(url, limited, args.count // 4, 1, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
