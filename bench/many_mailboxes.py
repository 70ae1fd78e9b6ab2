"""Benchmark: no-op syncs of many mailboxes through one fetcher process, by its concurrency.

Why this exists: a no-op sync is mostly waiting (about 10 round trips to the IMAP server), so a
fetcher that syncs one mailbox at a time spends its life idle (issue "thousands of mailboxes per
fetcher process"). ``MAILFERRY_FETCHER_CONCURRENCY`` lets one process wait on several servers at
once. This measures it: M mailboxes (Dovecot users) of K messages each behind the devkit's
latency proxy (``--rtt-ms``), one initial ``sync --all --wait``, then for each concurrency a
fresh fetcher process and a no-op ``sync --all --wait``: mailboxes per second (M over the
publish -> last run done time) and the fetcher's peak RSS. One persister throughout.

A report, not a test: it exits 1 only when a run fails. Other people's work may share the
machine: the load average before and after is printed with the figures.
``.venv/bin/python bench/many_mailboxes.py --mailboxes 100 --rtt-ms 50 --concurrency 1,8``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from mailferry import app, db, topology
from mailferry.crypto import PasswordBox
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.measure import machine, peak_memory_mb, wait_for_consumers
from mailferry.devkit.tcp_proxy import TcpProxy

PASSWORD = "bench-secret"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sync_all(env: dict[str, str], conn: psycopg.Connection[Any], timeout: float
             ) -> dict[str, Any]:
    started = time.monotonic()
    out = services.cli_json(["sync", "--all", "--wait", "--timeout", str(timeout), "--json"],
                            env, timeout=timeout + 60)
    seconds = time.monotonic() - started
    ids = [r["run_id"] for r in out]
    rows = conn.execute(
        """SELECT status, count(*) FROM sync_runs WHERE id = ANY(%s::uuid[]) GROUP BY status""",
        (ids,)).fetchall()
    return {"seconds": round(seconds, 2), "runs": dict(rows),
            "mailboxes_per_s": round(len(ids) / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=100)
    parser.add_argument("--messages", type=int, default=5, help="per mailbox")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, Any] = {"machine": machine(), "load_before": load(),
                              "mailboxes": args.mailboxes, "messages": args.messages,
                              "rtt_ms": args.rtt_ms, "passes": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="mailferry-bench-") as tmp:
        work = Path(tmp)
        with Dovecot(work / "dovecot") as server:
            users = [f"user{i:04d}" for i in range(args.mailboxes)]
            factory = mail.MessageFactory(1, datetime.now(UTC))
            for user in users:
                server.add_user(user, PASSWORD)
                server.fill_maildir(user, "INBOX",
                                    mail.generate(factory, args.messages, mail.Written()))
            proxy = TcpProxy(server.host, server.port, latency=args.rtt_ms / 2000)
            proxy.start()
            with services.private_database() as database_url, \
                    services.private_vhost() as (_, broker_url), \
                    psycopg.connect(database_url, autocommit=True) as conn:
                db.migrate(database_url)
                env = services.deployment_env(database_url, broker_url, fast=False)
                with db.connect(database_url, autocommit=True) as app_conn:
                    box = PasswordBox(env["MAILFERRY_SECRET_KEY"])
                    app.add_user(app_conn, "bench@example.com")
                    for user in users:
                        app.add_mailbox(app_conn, box, owner_email="bench@example.com",
                                        host=proxy.host, port=proxy.port, security="none",
                                        username=user, password=PASSWORD, folders=["INBOX"])
                persister = services.ServiceProcesses(env, work)
                persister.start("persister")
                try:
                    for index, level in enumerate(levels):
                        fenv = {**env, "MAILFERRY_FETCHER_CONCURRENCY": str(level)}
                        (work / f"c{level}").mkdir()
                        fetcher = services.ServiceProcesses(fenv, work / f"c{level}")
                        fetcher.start("fetcher")
                        try:
                            wait_for_consumers(broker_url, {topology.FETCHER.name: 1,
                                                            topology.PERSISTER.name: 1})
                            if index == 0:
                                print(f"initial sync of {args.mailboxes} mailboxes "
                                      f"(concurrency {level}) ...", flush=True)
                                report["initial"] = sync_all(fenv, conn, args.timeout)
                            print(f"no-op sync, concurrency {level} ...", flush=True)
                            figures = sync_all(fenv, conn, args.timeout)
                            pid = fetcher.processes[0][1].pid
                            figures |= {"concurrency": level,
                                        "fetcher_peak_rss_mb": peak_memory_mb(pid),
                                        "load_after": load()}
                            report["passes"].append(figures)
                            ok = ok and set(figures["runs"]) == {"done"}
                        finally:
                            fetcher.stop()
                finally:
                    persister.stop()
                    proxy.stop()
    report["load_after"] = load()
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
