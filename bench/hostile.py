"""Benchmark: what a huge message and a huge folder cost the fetcher, in time and memory.

Why this exists: a server is untrusted input (DESIGN invariant 9), so the fetcher's memory must
follow its limits on the bytes received, not what a server declares or holds. Three figures say
whether it does:

1. **Huge messages, through the whole pipeline** (fetcher and persister as processes, RabbitMQ,
   PostgreSQL), one mailbox of one message each, with the default limits
   (``MAILFERRY_MAX_MESSAGE_BYTES`` 64 MiB):
   - ``lying-80mib``: ``HostileImapServer("lying_size")``, an 80 MiB literal behind
     ``RFC822.SIZE 100``; it must be read, dropped and recorded with ``skipped_reason``;
   - ``genuine-60mib``: a real 60 MiB message in Dovecot (a base64 attachment); it must be
     stored byte for byte.
   Figures: the fetcher's peak RSS (VmHWM, read before it stops) against its RSS at rest, the
   persister's peak RSS, the fetcher's own attempt time (``sync.fetched``) and publish -> done.
2. **A folder of 1,000,000 UIDs, in-process** (``HostileImapServer("huge_folder")``, tiny
   generated messages): ``services.fetcher.planning.sync_folder`` over ``shared.imap.SyncSession``
   with a ``publish`` that counts and drops (no broker, no database: the full pipeline would
   store a million messages). The client runs in a child process of its own, so its peak RSS is
   its own and it does not share a GIL with the fake server. Timed per phase: LIST, SELECT, the
   windowed UID SEARCH of the whole folder, then the whole first sync (SEARCH, metadata FETCH,
   BODY.PEEK[] FETCH, events built).
3. **The same folder through the real fetcher process**, its messages dated one day apart per
   hundred UIDs and the mailbox's ``first_sync_days`` at 10, so the fetcher searches all
   1,000,000 UIDs and fetches only the last ~1,000: fetcher time, publish -> done, peak RSS.
4. **An endless LIST with the default limits** (``HostileImapServer("endless_list")``), in a
   child process: how long until the 80 MiB cap on one answer stops it, and the peak RSS of
   holding that many parsed LIST lines.

A report, not a test: it exits with 1 only when a result is wrong (a run that failed, a message
not stored or not skipped as it should be, a count that differs), never because it is slow.
Run it with ``.venv/bin/python bench/hostile.py`` (about 3 minutes on 2 cores);
``--uids 200000`` for a quicker pass, ``--only messages|folder|fetcher|list`` for one part.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from mailferry import db, topology
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.hostile_imap import FolderSpec, HostileImapServer, MiB
from mailferry.devkit.measure import json_lines, machine, peak_memory_mb, wait_for_consumers

REPO = Path(__file__).resolve().parents[1]

OWNER = "owner@example.com"
PASSWORD = "pw"


def rss_mb(pid: int) -> float | None:
    """VmRSS: the resident set now, in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


# --- 1. huge messages, through the pipeline ------------------------------------------------------


@contextlib.contextmanager
def deployment(base: Path, extra: dict[str, str] | None = None,
               ) -> Iterator[tuple[dict[str, str], psycopg.Connection[Any], services.ServiceProcesses]]:
    """A private database and vhost, a fetcher and a persister as processes, consuming."""
    with services.private_database() as database_url, \
            services.private_vhost() as (_, broker_url), \
            psycopg.connect(database_url, autocommit=True) as conn:
        db.migrate(database_url)
        env = services.deployment_env(database_url, broker_url, fast=False,
                                      MAILFERRY_LOG_LEVEL="info", **(extra or {}))
        services.cli_json(["user", "add", "--email", OWNER], env)
        (base / "logs").mkdir(parents=True)
        processes = services.ServiceProcesses(env, base / "logs")
        try:
            processes.start("fetcher")
            processes.start("persister")
            wait_for_consumers(broker_url, {topology.FETCHER.name: 1, topology.PERSISTER.name: 1})
            time.sleep(1.0)  # start-up imports settle: the RSS at rest
            yield env, conn, processes
        finally:
            processes.stop()


def add_mailbox(env: dict[str, str], port: int, user: str, *more: str) -> int:
    return int(services.cli_json(["mailbox", "add", "--owner", OWNER, "--host", "127.0.0.1", "--port",
                     str(port), "--security", "none", "--username", user, "--password-stdin",
                     "--folders", "INBOX", *more], env, stdin=f"{PASSWORD}\n".encode())["id"])


def synced(env: dict[str, str], conn: psycopg.Connection[Any], processes: services.ServiceProcesses,
           mailbox_id: int, timeout: float) -> dict[str, Any]:
    """One ``sync --wait`` and its figures; the services' peak RSS read before they stop."""
    pids = {name: p.pid for name, p in processes.processes}
    rest = rss_mb(pids["fetcher"])
    [run] = services.cli_json(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", str(timeout),
                  "--json"], env, timeout=timeout + 60)
    times = conn.execute("SELECT extract(epoch FROM finished_at - requested_at) FROM sync_runs "
                         "WHERE id = %s", (run["run_id"],)).fetchone()
    fetched = [e.get("seconds") for e in json_lines(processes.log_dir / "fetcher-0.log")
               if e.get("event") == "sync.fetched" and e.get("run_id") == str(run["run_id"])]
    return {"status": run["status"], "error": run["error"],
            "fetcher_s": fetched[-1] if fetched else None,
            "publish_to_done_s": round(float(times[0]), 2) if times and times[0] else None,
            "fetcher_rss_rest_mb": rest,
            "fetcher_peak_mb": peak_memory_mb(pids["fetcher"]),
            "persister_peak_mb": peak_memory_mb(pids["persister"])}


def huge_messages(base: Path, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with HostileImapServer("lying_size", messages=1, literal_bytes=80 * MiB,
                           stream_deadline=timeout) as server, \
            deployment(base / "lying", {"MAILFERRY_FIRST_SYNC_DAYS": "36500"}) as (env, conn, procs):
        mailbox_id = add_mailbox(env, server.port, "liar")
        print("[lying-80mib] syncing ...", flush=True)
        figures = synced(env, conn, procs, mailbox_id, timeout)
        [row] = services.cli_json(["messages", "list", "--mailbox", str(mailbox_id), "--json"], env)
        figures["stored"] = {k: row[k] for k in ("size", "sha256", "skipped_reason")}
        figures["ok"] = (figures["status"] == "done" and row["sha256"] is None
                         and row["size"] == 80 * MiB and bool(row["skipped_reason"]))
        out["lying-80mib"] = figures

    big = mail.attachment_message(60 * MiB)
    with Dovecot(base / "dovecot") as dovecot, \
            deployment(base / "genuine") as (env, conn, procs):
        dovecot.add_user("big", PASSWORD)
        dovecot.fill_maildir("big", "INBOX", [(big, datetime.now(UTC), ())])
        mailbox_id = add_mailbox(env, dovecot.port, "big")
        print(f"[genuine-60mib] syncing {len(big) / MiB:.1f} MiB ...", flush=True)
        figures = synced(env, conn, procs, mailbox_id, timeout)
        [row] = services.cli_json(["messages", "list", "--mailbox", str(mailbox_id), "--json"], env)
        figures["stored"] = {k: row[k] for k in ("size", "skipped_reason")}
        figures["ok"] = (figures["status"] == "done"
                         and row["sha256"] == hashlib.sha256(big).hexdigest())
        out["genuine-60mib"] = figures
    return out


# --- 2. a million UIDs, in-process ---------------------------------------------------------------


def peak_self_mb() -> float:
    """VmHWM of this process. Not ``ru_maxrss``: Linux carries that over exec from the parent,
    so a child of a big parent would report the parent's peak."""
    return peak_memory_mb(os.getpid()) or 0.0


def cpu_self_s() -> float:
    """CPU seconds of this process: the client's share of a wall time it shares with the fake
    server's process (one request, one answer, turn by turn)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timed:
    """A SyncSession whose calls are timed and counted by method name."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.window = session.window
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._session, name)
        if not callable(method):
            return method

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed


def huge_client(port: int, since: date, fetch: bool) -> dict[str, Any]:
    """Runs in the child process: connect, list, search the folder window by window, then the
    first sync of the whole folder through ``planning.sync_folder`` with a counting publish."""
    import uuid

    from mailferry.config import Settings
    from mailferry.imap import ImapConfig, SyncSession, connector_factory
    from mailferry.messages import MessagesFetched
    from mailferry.services.fetcher import planning

    settings = Settings()  # the defaults: the limits production runs with
    out: dict[str, Any] = {"rss_start_mb": peak_self_mb()}
    config = ImapConfig("127.0.0.1", port, "none", "bench", PASSWORD, timeout=60,
                        allow_private_networks=True, limits=settings.imap_limits())
    with connector_factory.create_imap_connector(config) as connector:
        started = time.perf_counter()
        session = SyncSession(connector)
        folders = session.list_folders()
        out["list_s"] = round(time.perf_counter() - started, 3)
        inbox = next(f for f in folders if f.raw_name == "INBOX")

        started = time.perf_counter()
        status = session.select(inbox)
        windows = list(session.iter_windows(1, status))
        found = sum(len(session.search(low, high)) for low, high in windows)
        out["search_all"] = {"seconds": round(time.perf_counter() - started, 2), "uids": found,
                             "windows": len(windows), "peak_mb": peak_self_mb()}
        if not fetch:
            return out

        counted = {"messages": 0, "bytes": 0, "events": 0}

        def publish(message: Any) -> None:
            counted["events"] += 1
            if isinstance(message, MessagesFetched):
                counted["messages"] += len(message.messages)
                counted["bytes"] += sum(m.size for m in message.messages)

        timed = Timed(session)
        job = planning.FolderJob(
            stamp=planning.Stamp(run_id=uuid.uuid4(), mailbox_id=1, lease_token=1),
            publish=publish, stored_flags=lambda *_: {}, found=lambda _n: None,
            limits=planning.BatchLimits(settings.batch_max_bytes, settings.batch_max_messages,
                                        settings.max_message_bytes),
            since=since)
        started, cpu = time.perf_counter(), cpu_self_s()
        planning.sync_folder(timed, inbox, None, job)
        out["first_sync"] = {"seconds": round(time.perf_counter() - started, 1),
                             "client_cpu_s": round(cpu_self_s() - cpu, 1), **counted,
                             "per_call_s": {k: round(v, 1) for k, v in timed.seconds.items()},
                             "calls": timed.calls, "peak_mb": peak_self_mb()}
    return out


def huge_folder(uids: int, fetch: bool, timeout: float) -> dict[str, Any]:
    with HostileImapServer("huge_folder", huge_uids=uids, stream_deadline=timeout) as server:
        print(f"[huge-folder {uids:,} UIDs, in-process] ...", flush=True)
        started = time.monotonic()
        child = subprocess.run(
            [sys.executable, __file__, "--huge-client", str(server.port),
             *([] if fetch else ["--no-fetch"])],
            capture_output=True, timeout=timeout, cwd=REPO)
        if child.returncode != 0:
            raise RuntimeError(f"the client failed: {child.stderr.decode()[-3000:]}")
        result: dict[str, Any] = json.loads(child.stdout.decode().splitlines()[-1])
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["ok"] = result["search_all"]["uids"] == uids and (
            not fetch or result["first_sync"]["messages"] == uids)
        return result


# --- 4. an endless LIST, in-process, default limits ----------------------------------------------


def endless_list_client(port: int) -> dict[str, Any]:
    """Runs in the child process: LIST against a server that never ends it, with the default
    limits (a 300 s command deadline, an 80 MiB cap on one command's answer)."""
    from mailferry.config import Settings
    from mailferry.errors import ImapError
    from mailferry.imap import ImapConfig, SyncSession, connector_factory

    config = ImapConfig("127.0.0.1", port, "none", "bench", PASSWORD, timeout=60,
                        allow_private_networks=True, limits=Settings().imap_limits())
    started = time.perf_counter()
    error = ""
    try:
        with connector_factory.create_imap_connector(config) as connector:
            SyncSession(connector).list_folders()
    except ImapError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"seconds": round(time.perf_counter() - started, 1), "error": error,
            "peak_mb": peak_self_mb()}


def endless_list(timeout: float) -> dict[str, Any]:
    with HostileImapServer("endless_list", stream_deadline=timeout) as server:
        print("[endless LIST, default limits] ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--list-client", str(server.port)],
                               capture_output=True, timeout=timeout, cwd=REPO)
        if child.returncode != 0:
            raise RuntimeError(f"the client failed: {child.stderr.decode()[-3000:]}")
        result: dict[str, Any] = json.loads(child.stdout.decode().splitlines()[-1])
        result["ok"] = "exceeded" in result["error"]
        return result


# --- 3. a million UIDs, the real fetcher, a recent window ----------------------------------------


def huge_folder_fetcher(base: Path, uids: int, timeout: float) -> dict[str, Any]:
    now = datetime.now(UTC)

    def dated(uid: int) -> datetime:  # a hundred messages a day, the newest today
        return now - timedelta(days=(uids - uid) // 100)

    days = 10
    expected = sum(1 for uid in range(max(1, uids - 2000), uids + 1)
                   if dated(uid).date() >= now.date() - timedelta(days=days))
    folders: dict[str, FolderSpec] = {"INBOX": FolderSpec(internal_date=dated)}
    with HostileImapServer("huge_folder", huge_uids=uids, folders=folders,
                           stream_deadline=timeout) as server, \
            deployment(base / "huge-fetcher") as (env, conn, procs):
        mailbox_id = add_mailbox(env, server.port, "huge", "--first-sync-days", str(days))
        print(f"[huge-folder {uids:,} UIDs, real fetcher, first_sync_days={days}] ...",
              flush=True)
        figures = synced(env, conn, procs, mailbox_id, timeout)
        stored = conn.execute("SELECT count(*) FROM message_folders").fetchone()
        figures["messages_stored"] = stored[0] if stored else 0
        figures["ok"] = figures["status"] == "done" and figures["messages_stored"] == expected
        return figures


def report(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}")
    for key, value in figures.items():
        print(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uids", type=int, default=1_000_000, help="UIDs of the huge folder")
    parser.add_argument("--only", choices=["messages", "folder", "fetcher", "list"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--no-fetch", action="store_true",
                        help="in-process: list and search the folder, do not fetch it")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--huge-client", type=int, help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--list-client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.huge_client:
        print(json.dumps(huge_client(args.huge_client, date(2000, 1, 1), not args.no_fetch)))
        return 0
    if args.list_client:
        print(json.dumps(endless_list_client(args.list_client)))
        return 0

    parts = args.only or ["messages", "folder", "fetcher", "list"]
    results: dict[str, Any] = {"machine": machine(), "date": datetime.now(UTC).isoformat()}
    with tempfile.TemporaryDirectory(prefix="mf-bench-hostile-") as tmp:
        base = Path(tmp)
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("messages", lambda: huge_messages(base, args.timeout)),
            ("folder", lambda: huge_folder(args.uids, not args.no_fetch, args.timeout)),
            ("fetcher", lambda: huge_folder_fetcher(base, args.uids, args.timeout)),
            ("list", lambda: endless_list(args.timeout)),
        ]
        for name, step in steps:
            if name in parts:
                results[name] = step()
                report(name, results[name])
    print(json.dumps(results))
    oks = [results["messages"][k]["ok"] for k in results.get("messages", {})]
    oks += [results[k]["ok"] for k in ("folder", "fetcher", "list") if k in results]
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
