"""Benchmark: push (issue 13). Two figures, on one private Dovecot, PostgreSQL and vhost:

1. **Latency** from an APPEND on the server to the message's row in PostgreSQL, with no `sync`
   command and the schedule an hour apart: ``--deliveries`` single messages (default 200), one at
   a time, spread round-robin over ``--mailboxes`` watched mailboxes (default 100), with one
   scheduler, one fetcher and one persister. The clock starts before the APPEND and stops when
   ``message_folders`` (polled every 10 ms) holds the new UID. p50 and p99. Targets: p50 <= 1 s,
   p99 <= 2 s. Every setting on the path is the production default (``MAILFERRY_PUSH_DEBOUNCE``
   included); the load average before and after is reported with the figures.
2. **Capacity**: ``--capacity`` watched mailboxes (default 1,000) in one scheduler process (no
   fetcher: the watches are what is measured). Once every watch is up: the scheduler's RSS, its
   RSS per watch over an empty scheduler's, its CPU over ``--idle`` seconds of quiet, then the
   time for a fresh scheduler to hold every watch after the first is killed with SIGKILL (lease
   ``MAILFERRY_PUSH_LEASE``, default here 10 s: the takeover waits for the dead one's leases).

A report, not a test: it exits 1 only when a result is wrong (a delivery never stored, a watch
never up), never because it is slow. ``.venv/bin/python bench/push.py [--quick]
[--latency-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from pydantic import SecretStr

from mailferry import app, db
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.measure import cpu_seconds, machine

PASSWORD = "bench-secret"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def add_mailboxes(url: str, key: str, server: Dovecot, first: int, count: int) -> list[int]:
    box = PasswordBox(SecretStr(key))
    ids = []
    with db.connect(url, autocommit=True) as conn:
        for i in range(first, first + count):
            server.add_user(f"u{i}", PASSWORD)
            ids.append(app.add_mailbox(conn, box, owner_email=None, host=server.host,
                                       port=server.port, security="none", username=f"u{i}",
                                       password=PASSWORD))
    return ids


def watching(url: str, holder_not: str | None = None) -> tuple[int, list[str]]:
    with psycopg.connect(url, row_factory=dict_row, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT holder FROM mailbox_watches
                WHERE state IN ('watching', 'polling') AND lease_expires_at > now()""").fetchall()
    holders = [r["holder"] for r in rows if r["holder"] != holder_not]
    return len(holders), sorted(set(holders))


def wait_until(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"FAILED: {what} within {timeout:g}s")
        time.sleep(0.05)
    return time.monotonic() - start


def latency(url: str, server: Dovecot, ids: list[int], deliveries: int) -> dict[str, Any]:
    seconds = []
    load_before = round(os.getloadavg()[0], 2)
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(deliveries):
            index = n % len(ids)
            start = time.monotonic()
            uid = server.append(f"u{index}", PASSWORD, "INBOX",
                                f"Subject: push {n}\r\n\r\nbody {n}\r\n".encode())
            while conn.execute(
                    """SELECT 1 FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
                        WHERE f.mailbox_id = %s AND f.raw_name = 'INBOX' AND mf.uid = %s""",
                    (ids[index], uid)).fetchone() is None:
                if time.monotonic() - start > 60:
                    raise SystemExit(f"FAILED: delivery {n} (mailbox {ids[index]}, UID {uid}) "
                                     "not stored within 60 s")
                time.sleep(0.01)
            seconds.append(time.monotonic() - start)
    seconds.sort()
    return {"deliveries": deliveries, "mailboxes": len(ids),
            "p50_s": round(statistics.median(seconds), 3),
            "p99_s": round(seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))], 3),
            "max_s": round(seconds[-1], 3), "load_1min_before": load_before,
            "load_1min_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mailboxes", type=int, default=100)
    parser.add_argument("--deliveries", type=int, default=200)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="10 mailboxes, 20 deliveries, 50")
    parser.add_argument("--latency-only", action="store_true", help="skip the capacity part")
    args = parser.parse_args()
    if args.quick:
        args.mailboxes, args.deliveries, args.capacity, args.idle = 10, 20, 50, 5.0
    report: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp, \
            Dovecot(Path(tmp) / "dovecot", max_connections_per_user=10) as server, \
            services.private_database() as url, services.private_vhost() as (_, broker_url):
        db.migrate(url)
        env = services.deployment_env(
            url, broker_url, fast=False, MAILFERRY_SYNC_INTERVAL="3600",
            MAILFERRY_SCHEDULER_TICK="1", MAILFERRY_PUSH_LEASE=str(args.lease),
            MAILFERRY_LOG_LEVEL="warning",
            MAILFERRY_ALLOW_PRIVATE_NETWORKS="1")
        key = env["MAILFERRY_SECRET_KEY"]
        ids = add_mailboxes(url, key, server, 0, args.mailboxes)

        procs = services.ServiceProcesses(env, Path(tmp))
        try:
            for service in ("scheduler", "fetcher", "persister"):
                procs.start(service)
            with psycopg.connect(url, autocommit=True) as conn:
                wait_until(lambda: conn.execute(
                    "SELECT count(DISTINCT mailbox_id) FROM sync_runs WHERE status = 'done'"
                ).fetchone()[0] >= len(ids), 600, "every first sync")  # type: ignore[index]
            wait_until(lambda: watching(url)[0] >= len(ids), 120, "every watch up")
            report["latency"] = latency(url, server, ids, args.deliveries)
            print(json.dumps(report["latency"]), file=sys.stderr)
        finally:
            procs.stop()
        if args.latency_only:
            print(json.dumps(report, indent=2))
            return

        add_mailboxes(url, key, server, args.mailboxes, args.capacity - args.mailboxes)
        procs = services.ServiceProcesses(env, Path(tmp))
        try:
            procs.start("scheduler")
            pid = procs.processes[0][1].pid
            time.sleep(3)
            empty_rss = rss_mb(pid)  # started; watches still connecting
            up = wait_until(lambda: watching(url)[0] >= args.capacity, 600, "every watch up")
            time.sleep(2)
            before = cpu_seconds(pid) or 0.0
            time.sleep(args.idle)
            idle_cpu = (cpu_seconds(pid) or 0.0) - before
            rss = rss_mb(pid)
            thread_count = threads(pid)
            holder = watching(url)[1][0]
            victim = procs.processes[0][1]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            procs.processes.clear()
            killed = time.monotonic()
            procs.start("scheduler")
            wait_until(lambda: watching(url, holder_not=holder)[0] >= args.capacity, 600,
                       "every watch taken over")
            report["capacity"] = {
                "watched_mailboxes": args.capacity, "seconds_to_watch_all": round(up, 1),
                "scheduler_rss_mb": rss, "rss_at_start_mb": empty_rss,
                "kib_per_watch": round((rss - empty_rss) * 1024 / args.capacity, 1),
                "threads": thread_count,
                "idle_cpu_percent": round(100 * idle_cpu / args.idle, 2),
                "takeover_s": round(time.monotonic() - killed, 1),
                "lease_s": args.lease}
        finally:
            procs.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
