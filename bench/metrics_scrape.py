"""Benchmark: what one Prometheus scrape of the scheduler (and of a persister) costs PostgreSQL.

Why this exists: the sync lag, the due mailboxes and the search backlog are read from PostgreSQL
when Prometheus scrapes (``mailferry.metrics.StoreCollector``), every 15 s by default. That must
stay cheap as mailboxes and their run history grow. The script fills a private database with
``--mailboxes`` mailboxes of ``--runs`` finished runs each, then times a few scrapes (every gauge
of the scheduler and the persister) and, for comparison, the scheduler's own ``due_mailboxes``.

A report, not a test: it prints figures and one JSON line; it never fails for being slow.
Run it with ``.venv/bin/python bench/metrics_scrape.py`` (under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mailferry import db, metrics
from mailferry.devkit import services
from mailferry.sync_requests import due_mailboxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20, help="finished runs per mailbox")
    parser.add_argument("--scrapes", type=int, default=5)
    args = parser.parse_args()
    with services.private_database() as url:
        db.migrate(url)
        with db.connect(url, autocommit=True) as conn:
            conn.execute("""INSERT INTO mailboxes (name, host, port, security, username,
                                                   password_encrypted)
                            SELECT 'm' || g, 'h', 993, 'ssl', 'u', '\\x00'
                              FROM generate_series(1, %s) g""", (args.mailboxes,))
            conn.execute("""INSERT INTO sync_runs (id, mailbox_id, status, requested_by, kind,
                                                   requested_at, finished_at)
                            SELECT gen_random_uuid(), m.id, 'done', 'scheduler', 'mailbox',
                                   now() - make_interval(mins => (r * 30 + m.id %% 30)::int),
                                   now() - make_interval(mins => (r * 30 + m.id %% 30)::int)
                              FROM mailboxes m CROSS JOIN generate_series(1, %s) r""",
                         (args.runs,))
            conn.execute("ANALYZE")
            collector = metrics.StoreCollector(url, scheduler_interval=1800, search_backlog=True)
            seconds = []
            for _ in range(args.scrapes):
                started = time.perf_counter()
                families = list(collector.collect())
                seconds.append(time.perf_counter() - started)
            assert len(families) == 8, families
            started = time.perf_counter()
            due = due_mailboxes(conn, 1800)
            due_seconds = time.perf_counter() - started
    result = {"mailboxes": args.mailboxes, "runs": args.mailboxes * args.runs,
              "scrape_median_s": round(statistics.median(seconds), 3),
              "scrape_max_s": round(max(seconds), 3),
              "due_mailboxes_s": round(due_seconds, 3), "due": len(due)}
    print(f"{args.mailboxes} mailboxes, {args.mailboxes * args.runs} runs: one scrape "
          f"{result['scrape_median_s']} s (median of {args.scrapes}, max {result['scrape_max_s']} s);"
          f" the scheduler's due_mailboxes {result['due_mailboxes_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
