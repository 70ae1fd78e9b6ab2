"""Benchmark: many small mailboxes on one server, the other half of issue 11.

Why this exists: a deployment holds thousands of mailboxes, most of them unchanged at each
sync. What matters then is how many mailboxes per second the fetchers get through, above all
when the server is a real network away: a no-op sync is a handful of round trips, and a fetcher
that waits on them one mailbox at a time spends its life waiting. The issue's targets: with
2 fetcher processes, a no-op pass over 1,000 mailboxes at 50 ms RTT at >= 50 mailboxes/s, the
fetchers' RSS reported, and zero deadlocks in PostgreSQL over the whole run.

What it does, for each of two rounds, *direct* (the fetchers talk to Dovecot on loopback) and
*latency* (through the devkit's TcpProxy adding --rtt-ms of round trip), each on a fresh
database and vhost:

1. M Dovecot users (one private Dovecot, shared by both rounds) of K messages each in INBOX and
   an empty Sent folder (the default selection: inbox and sent);
2. registered with one ``mailferry mailbox import`` (timed);
3. F fetchers and P persisters started as processes, their consumers awaited;
4. ``mailferry sync --all``, its runs polled until all are finished (as ``--wait`` does): the
   initial pass, then a no-op pass (nothing changed); mailboxes/s = M / the pass's wall time;
   the 1-minute load sampled every second meanwhile. A run that never finishes is reported
   (``stuck``) and expired after ``--stall`` seconds without progress, instead of holding the
   pass for MAILFERRY_RUN_TIMEOUT;
5. ``pg_stat_database.deadlocks`` before and after the round, the fetchers' peak RSS (VmHWM).

``--concurrency N`` (or MAILFERRY_FETCHER_CONCURRENCY in the environment) is passed to the
fetchers as MAILFERRY_FETCHER_CONCURRENCY, for a fetcher that works on several mailboxes at once.

This is a report, not a test: it exits with 1 only when a pass does not end with every run done
or the store does not hold M x K messages. Run it with ``.venv/bin/python bench/scale.py``
(1,000 x 20 takes a long while at 50 ms with one mailbox per fetcher at a time; ``--mailboxes
300`` for a quicker look).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailferry import db, topology
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot, dovecot_version
from mailferry.devkit.measure import machine, wait_for_consumers
from mailferry.devkit.tcp_proxy import TcpProxy

OWNER = "scale@example.com"
TARGET_NOOP_LATENCY = 50.0  # mailboxes/s, the no-op pass at 50 ms RTT


def user_name(i: int) -> str:
    return f"user{i:05d}"


def password(i: int) -> str:
    return f"pw-{i}-scale"


def prepare_server(server: Dovecot, mailboxes: int, messages: int, seed: int) -> float:
    """M users with K messages in INBOX and an empty Sent; returns seconds. Written while the
    server is stopped: the folders are then plain Maildir directories, not an IMAP CREATE (a
    login) each."""
    started = time.perf_counter()
    server.stop()
    rng = random.Random(seed)
    now = datetime.now(UTC)
    for i in range(mailboxes):
        server.add_user(user_name(i), password(i))
    for i in range(mailboxes):
        server.fill_maildir(user_name(i), "INBOX", (
            (mail.plain_message(i * messages + j, rng, rng.randint(1500, 4500)), now, ())
            for j in range(messages)))
        server.fill_maildir(user_name(i), "Sent", ())
    server.start()  # on the same port
    return time.perf_counter() - started


class LoadSampler:
    """os.getloadavg()'s 1-minute figure every second while a pass runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {"mean": round(statistics.mean(self.samples), 2),
                "max": round(max(self.samples), 2)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (``/proc/PID/stat``, fields 14 and 15); 0 once
    it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every process of the machine used so far (all cores, not idle or iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def broker_pids() -> list[int]:
    """The shared RabbitMQ's Erlang VM (the one whose home is /var/lib/rabbitmq)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"beam.smp" in cmdline and b"/var/lib/rabbitmq" in cmdline:
                out.append(int(proc.name))
    return out


class CpuMeter:
    """Where a pass's CPU went: the fetchers, the persisters, the PostgreSQL backends of the
    round's database, the broker (shared by every engineer's tests: an upper bound) and the
    whole machine (everyone's work)."""

    def __init__(self, conn: db.Connection, services: dict[str, list[int]]) -> None:
        self.conn = conn
        self.groups = {**services, "rabbitmq (shared)": broker_pids()}

    def _backends(self) -> list[int]:
        return [int(r["pid"]) for r in self.conn.execute(
            """SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()""").fetchall()]

    def __enter__(self) -> CpuMeter:
        self.groups["postgres backends"] = self._backends()
        self.before = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids}
        self.machine = machine_busy_seconds()
        return self

    def __exit__(self, *_: object) -> None:
        self.groups["postgres backends"] = sorted(
            set(self.groups["postgres backends"]) | set(self._backends()))
        self.after = {pid: cpu_seconds(pid) for pids in self.groups.values() for pid in pids}
        self.machine = machine_busy_seconds() - self.machine

    def summary(self) -> dict[str, float]:
        out = {name: round(sum(self.after[p] - self.before.get(p, 0.0) for p in pids), 1)
               for name, pids in self.groups.items()}
        out["machine (everyone)"] = round(self.machine, 1)
        return out


def deadlocks(conn: db.Connection) -> int:
    time.sleep(1.0)  # PostgreSQL flushes its statistics at most once a second
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT deadlocks FROM pg_stat_database "
                       "WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row["deadlocks"])


def sync_pass(env: dict[str, str], conn: db.Connection, mailboxes: int,
              args: argparse.Namespace, pids: dict[str, list[int]]) -> dict[str, Any]:
    """``mailferry sync --all``, then its runs polled until every one is finished, or none has
    finished for ``--stall`` seconds (a run that never completes is reported, not waited for
    up to MAILFERRY_RUN_TIMEOUT); those still active are then expired, so the next pass can
    queue their mailboxes."""
    with LoadSampler() as load, CpuMeter(conn, pids) as cpu:
        started = time.perf_counter()
        requested = services.cli_json(["sync", "--all", "--json"], env)
        request_seconds = time.perf_counter() - started  # the CLI's start-up included
        run_ids = [r["run_id"] for r in requested]
        finished, last_change = 0, time.perf_counter()
        while True:
            row = conn.execute(
                """SELECT count(*) FILTER (WHERE status IN ('queued', 'running')) AS active,
                          count(*) FILTER (WHERE status = 'done') AS done
                     FROM sync_runs WHERE id = ANY(%s::uuid[])""", (run_ids,)).fetchone()
            assert row is not None
            if row["active"] == 0:
                break
            if len(run_ids) - row["active"] != finished:
                finished, last_change = len(run_ids) - row["active"], time.perf_counter()
            if time.perf_counter() - last_change > args.stall or \
                    time.perf_counter() - started > args.timeout:
                break
            time.sleep(0.25)
        seconds = (last_change if row["active"] else time.perf_counter()) - started
    stuck = [dict(r) for r in conn.execute(
        """UPDATE sync_runs SET status = 'expired', finished_at = now(),
                  error = 'bench: no progress within --stall'
            WHERE id = ANY(%s::uuid[]) AND status IN ('queued', 'running')
        RETURNING mailbox_id, started_at IS NOT NULL AS started""", (run_ids,)).fetchall()]
    span = conn.execute(
        """SELECT extract(epoch FROM max(finished_at) - min(requested_at)) AS seconds
             FROM sync_runs WHERE id = ANY(%s::uuid[]) AND status = 'done'""",
        (run_ids,)).fetchone()
    statuses = {r["status"]: r["n"] for r in conn.execute(
        """SELECT status, count(*) AS n FROM sync_runs WHERE id = ANY(%s::uuid[])
            GROUP BY status""", (run_ids,)).fetchall()}
    return {"seconds": round(seconds, 2), "mailboxes_per_s": round(mailboxes / seconds, 2),
            "request_seconds": round(request_seconds, 2),
            # from the runs' insertion by `sync --all` (after its start-up) to the last done
            "pipeline_seconds": round(float(span["seconds"] or 0.0), 2) if span else None,
            "runs": statuses, "stuck": stuck, "load_1min": load.summary(),
            "cpu_seconds": cpu.summary()}


def run_round(label: str, port: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"round": label}
    overrides = {"MAILFERRY_LOG_LEVEL": "warning"}
    if args.concurrency:
        overrides["MAILFERRY_FETCHER_CONCURRENCY"] = str(args.concurrency)
    with services.private_database() as url, services.private_vhost() as (_, broker_url), \
            db.connect(url, autocommit=True) as conn:
        db.migrate(url)
        env = services.deployment_env(url, broker_url, fast=False, **overrides)
        services.cli_json(["user", "add", "--email", OWNER], env)
        lines = "".join(json.dumps({
            "owner": OWNER, "host": "127.0.0.1", "port": port, "security": "none",
            "username": user_name(i), "password": password(i)}) + "\n"
            for i in range(args.mailboxes))
        started = time.perf_counter()
        ids = services.cli_json(["mailbox", "import", "-"], env, stdin=lines.encode())["ids"]
        out["import_seconds"] = round(time.perf_counter() - started, 2)
        assert len(ids) == args.mailboxes
        logs = work / f"logs-{label}"
        logs.mkdir()
        processes = services.ServiceProcesses(env, logs)
        try:
            processes.start("fetcher", args.fetchers)
            processes.start("persister", args.persisters)
            wait_for_consumers(broker_url, {topology.FETCHER.name: args.fetchers,
                                            topology.PERSISTER.name: args.persisters},
                               check=processes.assert_running)
            out["deadlocks_before"] = deadlocks(conn)
            for name in ("initial", "noop"):
                print(f"[{label}] {name} pass over {args.mailboxes} mailboxes ...", flush=True)
                out[name] = sync_pass(env, conn, args.mailboxes, args, {
                    service: [p.pid for n, p in processes.processes if n == service]
                    for service in ("fetcher", "persister")})
                print(f"[{label}] {name}: {out[name]}", flush=True)
            out["deadlocks_after"] = deadlocks(conn)
            out["fetcher_peak_rss_mb"] = [round(processes.peak_rss("fetcher", i) / 2**20, 1)
                                          for i in range(args.fetchers)]
            out["persister_peak_rss_mb"] = [round(processes.peak_rss("persister", i) / 2**20, 1)
                                            for i in range(args.persisters)]
            stored = conn.execute("SELECT count(*) AS n FROM message_folders").fetchone()
            out["stored"] = stored["n"] if stored else 0
            processes.assert_running()
        finally:
            processes.stop()
    out["ok"] = (out["stored"] == args.mailboxes * args.messages
                 and all(set(out[p]["runs"]) == {"done"} for p in ("initial", "noop")))
    return out


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print()
    print("== many mailboxes ==")
    print(f"machine  {m['nproc']} CPUs ({m['cpu']}), {m['memory_gb']} GB RAM; load "
          f"{m['load_1min']} at the start; Dovecot {report['dovecot']}")
    print(f"{report['mailboxes']} mailboxes x {report['messages']} messages; "
          f"{report['fetchers']} fetchers, {report['persisters']} persisters; "
          f"MAILFERRY_FETCHER_CONCURRENCY={report['concurrency'] or '(unset)'}")
    print(f"{'round':<10}{'import s':>9}{'initial s':>11}{'mb/s':>8}{'no-op s':>9}{'mb/s':>8}"
          f"{'deadlocks':>11}  {'fetcher RSS MB':<16}load (mean/max)")
    for r in report["rounds"]:
        i, n = r["initial"], r["noop"]
        print(f"{r['round']:<10}{r['import_seconds']:>9}{i['seconds']:>11}"
              f"{i['mailboxes_per_s']:>8}{n['seconds']:>9}{n['mailboxes_per_s']:>8}"
              f"{r['deadlocks_after'] - r['deadlocks_before']:>11}  "
              f"{'/'.join(map(str, r['fetcher_peak_rss_mb'])):<16}"
              f"{i['load_1min']['mean']}/{i['load_1min']['max']}, "
              f"{n['load_1min']['mean']}/{n['load_1min']['max']}"
              f"{'' if r['ok'] else '  WRONG'}")
        for p in ("initial", "noop"):
            per = ", ".join(f"{k} {v} s ({1000 * v / report['mailboxes']:.0f} ms/mailbox)"
                            for k, v in r[p]["cpu_seconds"].items())
            print(f"  {r['round']} {p}: `sync --all` returned after {r[p]['request_seconds']} s; "
                  f"runs inserted to last done {r[p]['pipeline_seconds']} s; CPU: {per}")
            if r[p]["stuck"]:
                print(f"  {r['round']} {p}: {len(r[p]['stuck'])} run(s) never finished "
                      f"(mailboxes {[s['mailbox_id'] for s in r[p]['stuck']][:10]}); "
                      "the pass's time stops at its last finished run")
    print()
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20, help="per mailbox (20)")
    parser.add_argument("--fetchers", type=int, default=2)
    parser.add_argument("--persisters", type=int, default=2)
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="the latency round (50)")
    parser.add_argument("--rounds", default="direct,latency")
    parser.add_argument("--concurrency", type=int,
                        default=int(os.environ.get("MAILFERRY_FETCHER_CONCURRENCY") or 0),
                        help="MAILFERRY_FETCHER_CONCURRENCY for the fetchers (default: unset)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per pass")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="give up on a pass when no run finished for this long (60)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "scale", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(), "dovecot": dovecot_version(), "mailboxes": args.mailboxes,
        "messages": args.messages, "fetchers": args.fetchers, "persisters": args.persisters,
        "rtt_ms": args.rtt_ms, "concurrency": args.concurrency or None, "rounds": []}
    work = Path(tempfile.mkdtemp(prefix="mailferry-scale-"))
    try:
        with Dovecot(work / "dovecot") as server:
            report["server_setup_seconds"] = round(
                prepare_server(server, args.mailboxes, args.messages, args.seed), 1)
            print(f"Dovecot ready: {args.mailboxes} users in "
                  f"{report['server_setup_seconds']} s", flush=True)
            for label in args.rounds.split(","):
                if label == "direct":
                    report["rounds"].append(run_round(label, server.port, args, work))
                elif label == "latency":
                    with TcpProxy(server.host, server.port, latency=args.rtt_ms / 2000) as proxy:
                        report["rounds"].append(run_round(label, proxy.port, args, work))
                else:
                    parser.error(f"unknown round {label!r}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    return 0 if all(r["ok"] for r in report["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
