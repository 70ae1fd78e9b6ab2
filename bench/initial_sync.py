"""Benchmark: the initial sync of one large mailbox through the whole pipeline, against mbsync.

Why this exists: the first sync of a mailbox is the one heavy moment of mailferry's life (every
later sync costs what changed, DESIGN invariant 6), and users compare it with what they know: a
plain IMAP-to-Maildir copy. The target is that the pipeline (fetcher -> RabbitMQ -> persister ->
PostgreSQL, with MIME parsing and every durability guarantee) takes at most twice as long as
``mbsync`` pulling the same mailbox from the same server.

This is a report, not a test: it prints figures (and one JSON line with them) and fails only when
the result is wrong (a failed run, a message count that is not N), never because it is slow.

What it does:

1. writes N deterministic, realistic messages (log-normal sizes, median about 6 KB, a long tail of
   messages carrying base64 attachments) straight into the INBOX Maildir of a private Dovecot;
2. creates a private PostgreSQL database and RabbitMQ vhost, starts the fetcher(s), persister(s)
   and notifier as separate processes (as in production) and times ``mailferry sync --wait``
   from publish to done; meanwhile it samples the persister queue's backlog and counts the CPU
   seconds of every process on the machine (services, PostgreSQL, RabbitMQ, Dovecot), and with
   ``--profile`` samples the fetcher and persister with py-spy;
3. checks that the store holds exactly N messages whose raw bytes add up to what was written;
4. pulls the same mailbox with ``mbsync`` into fresh Maildirs, with its default ``FSync yes``
   and with ``FSync no``, three times each, and keeps the medians;
5. prints a summary, then one JSON line with the same figures.

Run it with ``make bench`` or ``.venv/bin/python bench/initial_sync.py --messages 20000``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from cryptography.fernet import Fernet

from mailferry import broker, db, topology
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot, dovecot_version
from mailferry.devkit.measure import cpu_seconds, json_lines, machine, peak_memory_mb, wait_for_consumers

REPO = Path(__file__).resolve().parents[1]

USER = "bench"
PASSWORD = "bench-secret"
OWNER_EMAIL = "bench@example.com"
PROFILE_RATE = 100  # py-spy samples per second
TARGET_RATIO = 2.0  # the first goal: pipeline <= 2 x mbsync at N = 20,000
# Issue 11's targets (N = 20,000, 1 fetcher + 1 persister):
TARGET_RATIO_DEFAULT = 1.0  # pipeline <= 1.0 x mbsync with its default FSync yes
TARGET_RATIO_NOFSYNC = 2.0  # pipeline <= 2.0 x mbsync with FSync no
TARGET_PERSISTER_MS = 0.35  # persister CPU per message, during the sync
TARGET_RABBIT_RATIO = 1.1  # bytes RabbitMQ takes in per email / the email's size
STATS_SECONDS = 6.0  # RabbitMQ's management API refreshes its counters every 5 s

# --- measuring -------------------------------------------------------------------------------


class CpuAccount:
    """CPU seconds spent by every process on the machine during the sync, grouped by program.

    On a small machine the pipeline's parts compete for the same cores: the services, but also
    PostgreSQL's backend, RabbitMQ (beam.smp, which writes every event to its quorum log) and
    Dovecot's imap process. Knowing who burns the cores says whether more workers can help
    (idle cores) or only less work per message can (saturated cores).
    """

    def __init__(self, names: dict[int, str], interval: float = 0.5) -> None:
        self.names = names  # pid -> service name, for our own processes
        self.interval = interval
        self._start: dict[int, tuple[str, int]] = {}
        self._last: dict[int, tuple[str, int]] = {}
        self._busy_start = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu", daemon=True)

    def _run(self) -> None:
        # Processes that end during the sync (Dovecot's imap process exits when the fetcher
        # logs out) are only seen by a sample taken while they lived.
        while not self._stop.wait(self.interval):
            self._last.update(self._processes())

    @staticmethod
    def _processes() -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1:text.rindex(")")]
            fields = text[text.rindex(")") + 2:].split()
            out[int(stat.parent.name)] = (comm, int(fields[11]) + int(fields[12]))
        return out

    @staticmethod
    def _machine() -> tuple[int, int]:
        """(busy, total) jiffies of all CPUs since boot."""
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    def start(self) -> None:
        self._start = self._processes()
        self._busy_start = self._machine()
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=10)
        end = {**self._last, **self._processes()}
        busy, total = self._machine()
        tick = os.sysconf("SC_CLK_TCK")
        by_program: dict[str, float] = {}
        for pid, (comm, ticks) in end.items():
            before = self._start.get(pid)
            used = ticks - (before[1] if before and before[0] == comm else 0)
            if used > 0:
                name = self.names.get(pid) or comm.split("/", 1)[0]  # kworker/u8:2 -> kworker
                by_program[name] = by_program.get(name, 0.0) + used / tick
        top = dict(sorted(by_program.items(), key=lambda kv: -kv[1])[:10])
        window = total - self._busy_start[1]
        return {
            "by_program": {k: round(v, 2) for k, v in top.items()},
            "machine_busy_percent": round(100 * (busy - self._busy_start[0]) / window, 1)
            if window else None,
        }


class QueueSampler:
    """Samples the persister queue's backlog and the run's stored count while the sync runs.

    A backlog that grows means the persister is slower than the fetcher; one that stays near
    zero means the fetcher (or IMAP) is the bottleneck. The time the backlog was last non-zero
    against the time the fetcher finished tells how long the persister lagged behind.
    """

    def __init__(self, broker_url: str, database_url: str, mailbox_id: int,
                 interval: float = 0.5) -> None:
        self.broker_url = broker_url
        self.database_url = database_url
        self.mailbox_id = mailbox_id
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (seconds, queue depth, stored)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._started = 0.0

    def __enter__(self) -> QueueSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = broker.connect(self.broker_url)
        pg = db.connect(self.database_url, autocommit=True)
        try:
            channel = conn.channel()
            while not self._stop.wait(self.interval):
                try:
                    depth = int(channel.queue_declare(topology.PERSISTER.name,
                                                      passive=True).message_count)
                except Exception:
                    channel = conn.channel()
                    depth = -1
                row = pg.execute(
                    """SELECT COALESCE(max(messages_stored), 0) AS n FROM sync_runs
                        WHERE mailbox_id = %s""", (self.mailbox_id,)).fetchone()
                stored = int(row["n"]) if row else 0
                self.samples.append((round(time.monotonic() - self._started, 2), depth, stored))
        finally:
            pg.close()
            conn.release()

    def peak_backlog(self) -> int:
        return max((depth for _, depth, _ in self.samples), default=0)

    def timeline(self, points: int = 12) -> list[tuple[float, int, int]]:
        step = max(len(self.samples) // points, 1)
        return self.samples[::step]


def rabbit_received_bytes(vhost: str) -> int:
    """Bytes RabbitMQ received on the vhost's connections (AMQP frames: bodies, headers,
    properties, acks), from the management API. Private vhost: only this pipeline's traffic.
    The API refreshes it every few seconds (``collect_statistics_interval``)."""
    info = services.rabbit_api("GET", f"/vhosts/{quote(vhost, safe='')}")
    return int(info.get("recv_oct") or 0) if isinstance(info, dict) else 0


def rabbit_disk_writes() -> int:
    """Bytes the RabbitMQ node (``beam.smp``) has written to storage since it started
    (``/proc/<pid>/io``: quorum logs, segments, everything). Machine-wide: other vhosts' traffic
    counts too, so it is an upper bound on a shared machine."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/comm"):
        try:
            if status.read_text().strip() != "beam.smp":
                continue
            io = (status.parent / "io").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in io.splitlines()
                       if line.startswith("write_bytes:")), 0)
    return total


def _service_pids(processes: services.ServiceProcesses) -> dict[str, int]:
    """"fetcher", "persister", ... or "persister-0", "persister-1" when there are several."""
    names = [name for name, _ in processes.processes]
    out: dict[str, int] = {}
    for name, process in processes.processes:
        if names.count(name) == 1:
            out[name] = process.pid
        else:
            out[f"{name}-{sum(1 for key in out if key.startswith(name + '-'))}"] = process.pid
    return out


def log_breakdown(log_dir: Path) -> dict[str, Any]:
    """With ``--log-level info``: the fetcher's own duration and the persister's busy time per
    event type (``event.applied`` lines carry ``seconds``, parse and SQL together)."""
    out: dict[str, Any] = {}
    for path in sorted(log_dir.glob("fetcher-*.log")):
        for entry in json_lines(path):
            if entry.get("event") == "sync.fetched":
                out.setdefault("fetcher_seconds", []).append(entry.get("seconds"))
    busy: dict[str, float] = {}
    for path in sorted(log_dir.glob("persister-*.log")):
        for entry in json_lines(path):
            if entry.get("event") == "event.applied":
                kind = str(entry.get("type"))
                busy[kind] = busy.get(kind, 0.0) + float(entry.get("seconds") or 0)
    if busy:
        out["persister_busy_seconds"] = {k: round(v, 2) for k, v in sorted(busy.items())}
    return out


class Profiler:
    """py-spy on the fetcher and persister processes while the sync runs (``--profile``).

    Sampling from outside (``--nonblocking``) leaves the services as they are in production;
    idle frames are kept (``--idle``) so that waiting on PostgreSQL, IMAP or RabbitMQ shows up
    as the wall time it costs, not only the CPU time.
    """

    def __init__(self, binary: str, out_dir: Path) -> None:
        self.binary = binary
        self.out_dir = out_dir
        self.recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, pids: dict[str, int]) -> None:
        self.out_dir.mkdir(exist_ok=True)
        for key, pid in pids.items():
            if not key.startswith(("fetcher", "persister")):
                continue
            out = self.out_dir / f"{key}.txt"
            process = subprocess.Popen(
                [self.binary, "record", "--pid", str(pid), "--idle", "--threads",
                 "--nonblocking", "--rate", str(PROFILE_RATE), "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.recorders[key] = (process, out)
        time.sleep(1.0)  # py-spy attaches asynchronously

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop recording; per service, the main thread's seconds by activity."""
        for process, _ in self.recorders.values():
            process.send_signal(signal.SIGINT)
        out: dict[str, dict[str, float]] = {}
        for key, (process, path) in self.recorders.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if path.exists():
                out[key] = profile_breakdown(path)
        return out


# (substring of a frame, activity): a sample counts for the first activity any of its frames
# matches, so the order goes from the most specific work to the loops that call it (the
# persister's handler runs inside kombu's drain_events, its SQL inside the handler, and so on).
_ACTIVITIES = (
    ("shared/mime.py", "MIME parse"),
    # py-spy sometimes loses the outer frames of the feed parser's generators: still parsing.
    # (Not all of email/: imapclient parses INTERNALDATE with email.utils.)
    ("email/feedparser", "MIME parse"),
    ("email/parser", "MIME parse"),
    ("sha256", "sha256"),
    ("executemany", "SQL executemany (raw_messages, messages, message_folders)"),
    ("psycopg", "SQL, other statements"),
    ("shared/messages.py", "event JSON encode/decode (pydantic, base64)"),
    ("pydantic", "event JSON encode/decode (pydantic, base64)"),
    ("publish (shared/broker.py", "AMQP publish + confirm"),
    ("imapclient/response_", "IMAP response parsing"),
    ("imapclient", "IMAP FETCH (socket)"),
    ("imaplib", "IMAP FETCH (socket)"),
    ("on_message (shared/broker.py", "handler, other"),
    ("drain_events", "idle: waiting for AMQP deliveries"),
)


def profile_breakdown(path: Path) -> dict[str, float]:
    """Seconds of the main thread per activity, from py-spy's raw (collapsed) stacks."""
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        # With --threads the first frame names the thread; helper threads (the fetcher's lease
        # renewal) sleep and would swamp the figures with idle samples.
        if frames and "MainThread" not in frames[0] and "thread" in frames[0].lower():
            continue
        activity = next((name for needle, name in _ACTIVITIES
                         if any(needle in frame for frame in frames)), "other")
        if activity.startswith("SQL"):
            # psycopg's Connection.wait: the statement is on the server (or the wire).
            server = "Connection.wait (psycopg" in frames[-1]
            activity += ": waiting for PostgreSQL" if server else ": client side (psycopg)"
        counts[activity] = counts.get(activity, 0) + int(number)
    return {k: round(v / PROFILE_RATE, 2) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


# --- the two contenders ----------------------------------------------------------------------


def run_pipeline(args: argparse.Namespace, server: Dovecot, work: Path, expected: mail.Written
                 ) -> dict[str, Any]:
    """The four services as processes on a private database and vhost; time one initial sync."""
    result: dict[str, Any] = {}
    with services.private_database() as database_url, services.private_vhost() as (vhost, broker_url):
        db.migrate(database_url)
        env = {
            "MAILFERRY_DATABASE_URL": database_url,
            "MAILFERRY_BROKER_URL": broker_url,
            "MAILFERRY_SECRET_KEY": Fernet.generate_key().decode(),
            "MAILFERRY_LOG_LEVEL": args.log_level,
            "MAILFERRY_LOG_FORMAT": "json",
            "MAILFERRY_ALLOW_PRIVATE_NETWORKS": "1",  # Dovecot listens on 127.0.0.1
        }
        services.cli_json(["user", "add", "--email", OWNER_EMAIL], env)
        mailbox_id = int(services.cli_json(
            ["mailbox", "add", "--owner", OWNER_EMAIL, "--host", server.host, "--port",
             str(server.port), "--security", "none", "--username", USER, "--password-stdin",
             "--folders", "INBOX"],
            env, stdin=f"{PASSWORD}\n".encode())["id"])

        log_dir = work / "logs"
        log_dir.mkdir(exist_ok=True)
        processes = services.ServiceProcesses(env, log_dir)
        try:
            processes.start("fetcher", args.fetchers)
            processes.start("persister", args.persisters)
            processes.start("notifier")
            wait_for_consumers(broker_url, {topology.FETCHER.name: args.fetchers,
                                            topology.PERSISTER.name: args.persisters,
                                            topology.NOTIFIER.name: 1})
            profiler = Profiler(args.py_spy, work / "profiles") if args.py_spy else None
            if profiler:
                profiler.start(_service_pids(processes))
            os.sync()  # the 330 MB just written to the Maildir must not be flushed meanwhile
            print(f"services consuming; syncing mailbox {mailbox_id} ...", flush=True)
            account = CpuAccount({pid: key for key, pid in _service_pids(processes).items()})
            time.sleep(STATS_SECONDS)  # the management API's byte counts lag that much
            received_before, written_before = rabbit_received_bytes(vhost), rabbit_disk_writes()
            persisters = {k: p for k, p in _service_pids(processes).items()
                          if k.startswith("persister")}
            with QueueSampler(broker_url, database_url, mailbox_id) as sampler:
                threads_before = {k: thread_ticks(p) for k, p in persisters.items()}
                account.start()
                started = time.monotonic()
                synced = services.run_cli(
                    ["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout",
                     str(args.timeout), "--json"], env, timeout=args.timeout + 60)
                cli_seconds = time.monotonic() - started
                result["cpu_during_sync"] = account.stop()
                threads_after = {k: thread_ticks(p) for k, p in persisters.items()}
            if profiler:
                result["profile_seconds"] = profiler.stop()
            written = rabbit_disk_writes() - written_before
            if synced.returncode == 0:
                # once idle, the persisters parse the mail a first sync stored raw, then index
                # it for search (services/persister/indexer.py): timed, and their CPU counted
                after = CpuAccount({pid: key for key, pid in _service_pids(processes).items()})
                after.start()
                ended = time.monotonic()
                result["parsed_after_seconds"] = _wait_until_none(
                    database_url, mailbox_id, "parsed_at IS NULL", args.timeout, ended)
                result["search_indexed_after_seconds"] = _wait_until_none(
                    database_url, mailbox_id, "search_vector IS NULL", args.timeout, ended)
                result["cpu_after_sync"] = after.stop()
            # which of the persister's threads used the CPU: the event handler, the change
            # stream's relay, the parse step, the indexer, AMQP (thread names from py-spy)
            names = {k: thread_names(p) for k, p in persisters.items()}
            result["persister_threads_during_sync"] = {
                k: _by_thread(threads_before[k], threads_after[k], names[k]) for k in persisters}
            time.sleep(STATS_SECONDS)
            result["rabbit_received_bytes"] = rabbit_received_bytes(vhost) - received_before
            result["rabbit_disk_written_bytes"] = written
            result["rabbit_disk_written_bytes_later"] = rabbit_disk_writes() - written_before
            result["memory_mb"], result["cpu_seconds"] = {}, {}
            for key, pid in _service_pids(processes).items():
                result["memory_mb"][key] = peak_memory_mb(pid)
                result["cpu_seconds"][key] = cpu_seconds(pid)
            dead = [(n, p.returncode) for n, p in processes.processes if p.poll() is not None]
        finally:
            processes.stop()
        if synced.returncode != 0 or dead:
            raise RuntimeError(
                f"sync failed ({synced.returncode}, services exited: {dead}): "
                f"{synced.stderr.decode(errors='replace')[-2000:]}\n{processes.logs()}")
        run = json.loads(synced.stdout)[0]
        with psycopg.connect(database_url) as conn:
            timing = conn.execute(
                """SELECT extract(epoch FROM finished_at - requested_at)::float8,
                          extract(epoch FROM started_at - requested_at)::float8
                     FROM sync_runs WHERE id = %s""", (run["run_id"],)).fetchone()
            counts = conn.execute(
                """SELECT (SELECT count(*) FROM messages WHERE mailbox_id = %(mb)s),
                          (SELECT count(*) FROM message_folders mf JOIN folders f
                               ON f.id = mf.folder_id
                            WHERE f.mailbox_id = %(mb)s AND mf.expunged_at IS NULL),
                          (SELECT COALESCE(sum(r.size), 0) FROM messages g
                               JOIN raw_messages r ON r.sha256 = g.sha256
                            WHERE g.mailbox_id = %(mb)s),
                          (SELECT count(*) FROM messages
                            WHERE mailbox_id = %(mb)s AND cardinality(parse_errors) > 0),
                          pg_database_size(current_database()),
                          (SELECT count(*) FROM messages
                            WHERE mailbox_id = %(mb)s AND parsed_at IS NULL)""",
                {"mb": mailbox_id}).fetchone()
            pg_version = conn.execute("SHOW server_version").fetchone()
        assert timing is not None and counts is not None
        result.update(
            status=run["status"],
            seconds=round(timing[0], 2),
            seconds_cli=round(cli_seconds, 2),
            queue_wait_seconds=round(timing[1] or 0.0, 2),
            messages_stored=run["messages_stored"],
            messages_rows=counts[0],
            placements=counts[1],
            raw_bytes=int(counts[2]),
            with_parse_errors=counts[3],
            unparsed=counts[5],
            database_mb=round(counts[4] / 1e6, 1),
            persister_peak_backlog=sampler.peak_backlog(),
            timeline=sampler.timeline(),
            postgresql=pg_version[0] if pg_version else None,
            **log_breakdown(log_dir),
        )
        result["ok"] = (run["status"] == "done" and counts[0] == expected.count and counts[5] == 0
                        and counts[1] == expected.count and counts[2] == expected.total_bytes)
    return result


def thread_ticks(pid: int) -> dict[int, int]:
    """CPU jiffies (user + system) of each thread of ``pid`` so far."""
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        out[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from ``py-spy dump`` when it is installed."""
    binary = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if binary is None:
        return {}
    try:
        dump = subprocess.run([binary, "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in dump.splitlines():
        if line.startswith("Thread ") and '"' in line:
            names[int(line.split()[1])] = line.split('"')[1]
    return names


def _by_thread(before: dict[int, int], after: dict[int, int],
               names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of each thread between two ``thread_ticks``, by thread name."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid, ticks in after.items():
        used = (ticks - before.get(tid, 0)) / hz
        if used > 0:
            name = names.get(tid, f"thread {tid}")
            out[name] = round(out.get(name, 0.0) + used, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _wait_until_none(database_url: str, mailbox_id: int, condition: str, timeout: float,
                     started: float) -> float | None:
    """Seconds from ``started`` (the end of the sync) until no message of the mailbox meets
    ``condition`` (not parsed yet, not searchable yet)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() - started < timeout:
            row = conn.execute(f"SELECT count(*) FROM messages WHERE mailbox_id = %s "
                               f"AND {condition}", (mailbox_id,)).fetchone()
            if row is not None and row[0] == 0:
                return round(time.monotonic() - started, 1)
            time.sleep(0.5)
    return None


def run_mbsync(server: Dovecot, work: Path, expected: int, *, fsync: bool,
               runs: int) -> dict[str, Any]:
    """Pull the same INBOX with mbsync into a fresh Maildir: the yardstick users know.

    ``fsync``: mbsync's default fsyncs every message it stores, which on this kind of VM costs
    more than the download itself; ``FSync no`` shows the bare copy speed. Both are reported
    because they bracket the pipeline's own durability (one PostgreSQL commit per batch).
    Each is run ``runs`` times into a fresh Maildir and the median kept: on a shared VM single
    runs of a few seconds vary by a factor of two or more.
    """
    binary = shutil.which("mbsync")
    if binary is None:
        return {"skipped": "mbsync not installed (apt-get install isync, or WITH_MBSYNC=1 "
                           "scripts/setup-deps.sh)"}
    version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    label = "fsync" if fsync else "nofsync"
    results = [_mbsync_once(binary, server, work / f"mbsync-{label}-{run}", expected, fsync)
               for run in range(runs)]
    return {
        "version": version,
        "seconds": round(statistics.median(r["seconds"] for r in results), 2),
        "all_seconds": [r["seconds"] for r in results],
        "returncode": max(r["returncode"] for r in results),
        "stderr": results[-1]["stderr"],
        "messages": min(r["messages"] for r in results),
        "memory_mb": max(r["memory_mb"] for r in results),
        "ok": all(r["ok"] for r in results),
    }


def _mbsync_once(binary: str, server: Dovecot, directory: Path, expected: int,
                 fsync: bool) -> dict[str, Any]:
    near = directory / "maildir"
    near.mkdir(parents=True)
    config = directory / "mbsyncrc"
    # isync 1.4 syntax (Far/Near; 1.3 said Master/Slave). SyncState * keeps the state files in
    # the Maildir, so nothing is written to $HOME.
    config.write_text(f"""\
FSync {"yes" if fsync else "no"}

IMAPAccount bench
Host {server.host}
Port {server.port}
User {USER}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore bench-far
Account bench

MaildirStore bench-near
Path {near}/
Inbox {near}/INBOX
SubFolders Verbatim

Channel bench
Far :bench-far:
Near :bench-near:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""")
    errors = directory / "mbsync.err"
    os.sync()  # start from no dirty pages, like the pipeline: neither pays for the other
    with open(errors, "wb") as stderr:
        started = time.monotonic()
        process = subprocess.Popen([binary, "-c", str(config), "-q", "bench"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        # wait4 gives the child's own peak RSS, with no polling.
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    files = [p for sub in ("cur", "new") for p in (near / "INBOX" / sub).glob("*") if p.is_file()]
    result = {
        "seconds": round(seconds, 2),
        "returncode": process.returncode,
        "stderr": errors.read_text(errors="replace")[-1000:],
        "messages": len(files),
        "memory_mb": round(usage.ru_maxrss / 1024, 1),
        "ok": process.returncode == 0 and len(files) == expected,
    }
    shutil.rmtree(near)  # 330 MB per run: do not let --keep fill the disk
    return result


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000, help="N (default 20000)")
    parser.add_argument("--fetchers", type=int, default=1, help="fetcher processes (default 1)")
    parser.add_argument("--persisters", type=int, default=1,
                        help="persister processes (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="of the generated messages")
    parser.add_argument("--no-mbsync", action="store_true", help="skip the mbsync comparison")
    parser.add_argument("--mbsync-runs", type=int, default=3,
                        help="runs of each mbsync variant; the median counts (default 3)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (service logs, Maildirs) and print where it is")
    parser.add_argument("--log-level", default="warning",
                        help="services' MAILFERRY_LOG_LEVEL; 'info' adds the fetcher/persister "
                             "time breakdown from their logs (default warning)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the fetcher(s) and persister(s) with py-spy during the sync "
                             "and print where their time goes (pip install py-spy)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the sync")
    args = parser.parse_args(argv)
    args.py_spy = None
    if args.profile:
        args.py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(
            Path(sys.executable).parent))
        if args.py_spy is None:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    if min(args.messages, args.fetchers, args.persisters, args.mbsync_runs) < 1:
        parser.error("--messages, --fetchers, --persisters and --mbsync-runs must be at least 1")
    return args


def _mb(n: float) -> float:
    return round(n / 1e6, 1)


def summarise(args: argparse.Namespace, host: dict[str, Any], corpus: mail.Written, fill_seconds: float,
              pipeline: dict[str, Any], mbsyncs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures of the report, flat enough for one JSON line."""
    sizes = sorted(corpus.sizes)
    seconds = pipeline["seconds"]
    summary: dict[str, Any] = {
        "benchmark": "initial_sync",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "versions": {"dovecot": dovecot_version(), "postgresql": pipeline.get("postgresql"),
                     "mbsync": mbsyncs.get("default", {}).get("version")},
        "messages": corpus.count,
        "total_mb": _mb(corpus.total_bytes),
        "median_kb": round(sizes[len(sizes) // 2] / 1000, 1),
        "max_mb": round(sizes[-1] / 1e6, 2),
        "kinds": corpus.kinds,
        "unicode_subjects": corpus.unicode_subjects,
        "fill_seconds": round(fill_seconds, 2),
        "fetchers": args.fetchers,
        "persisters": args.persisters,
        "pipeline_seconds": seconds,
        "pipeline_seconds_cli": pipeline["seconds_cli"],
        "queue_wait_seconds": pipeline["queue_wait_seconds"],
        "search_indexed_after_seconds": pipeline.get("search_indexed_after_seconds"),
        "parsed_after_seconds": pipeline.get("parsed_after_seconds"),
        "messages_per_second": round(corpus.count / seconds, 1) if seconds else None,
        "mb_per_second": round(corpus.total_bytes / 1e6 / seconds, 2) if seconds else None,
        "stored_messages": pipeline["messages_rows"],
        "stored_placements": pipeline["placements"],
        "stored_raw_mb": _mb(pipeline["raw_bytes"]),
        "with_parse_errors": pipeline["with_parse_errors"],
        "database_mb": pipeline["database_mb"],
        "persister_peak_backlog": pipeline["persister_peak_backlog"],
        "peak_memory_mb": pipeline["memory_mb"],
        "cpu_seconds": pipeline["cpu_seconds"],
        "pipeline_ok": pipeline["ok"],
    }
    summary["cpu_during_sync"] = pipeline["cpu_during_sync"]
    persister_cpu = sum(v for k, v in pipeline["cpu_during_sync"]["by_program"].items()
                        if k.startswith("persister"))
    summary["persister_cpu_ms_per_message"] = round(1000 * persister_cpu / corpus.count, 3)
    if "cpu_after_sync" in pipeline:  # the parse and the search index, after the sync
        summary["cpu_after_sync"] = pipeline["cpu_after_sync"]
        later = sum(v for k, v in pipeline["cpu_after_sync"]["by_program"].items()
                    if k.startswith("persister"))
        summary["persister_cpu_ms_per_message_after_sync"] = round(1000 * later / corpus.count, 3)
        summary["persister_cpu_ms_per_message_whole"] = round(
            1000 * (persister_cpu + later) / corpus.count, 3)
    for key in ("rabbit_received_bytes", "rabbit_disk_written_bytes",
                "rabbit_disk_written_bytes_later"):
        if key in pipeline:
            summary[key] = pipeline[key]
            summary[key.replace("_bytes", "_per_email_byte")] = round(
                pipeline[key] / corpus.total_bytes, 3)
    for key in ("fetcher_seconds", "persister_busy_seconds", "profile_seconds",
                "persister_threads_during_sync"):
        if key in pipeline:
            summary[key] = pipeline[key]
    default, nofsync = mbsyncs.get("default", {}), mbsyncs.get("nofsync", {})
    if "seconds" in default:
        summary.update(
            mbsync_seconds=default["seconds"],
            mbsync_all_seconds=default["all_seconds"],
            mbsync_messages=default["messages"],
            mbsync_memory_mb=default["memory_mb"],
            mbsync_ok=default["ok"] and nofsync.get("ok", True),
            ratio=round(seconds / default["seconds"], 2) if default["seconds"] else None,
        )
        summary["target_met"] = summary["ratio"] is not None and summary["ratio"] <= TARGET_RATIO
    if "seconds" in nofsync:
        summary.update(
            mbsync_nofsync_seconds=nofsync["seconds"],
            mbsync_nofsync_all_seconds=nofsync["all_seconds"],
            ratio_nofsync=round(seconds / nofsync["seconds"], 2) if nofsync["seconds"] else None,
        )
        summary["target_met_nofsync"] = (summary["ratio_nofsync"] is not None
                                         and summary["ratio_nofsync"] <= TARGET_RATIO)
    summary["issue11_targets"] = {
        "ratio_default<=1.0": summary.get("ratio") is not None
        and summary["ratio"] <= TARGET_RATIO_DEFAULT,
        "ratio_nofsync<=2.0": summary.get("ratio_nofsync") is not None
        and summary["ratio_nofsync"] <= TARGET_RATIO_NOFSYNC,
        "persister_ms<=0.35": summary["persister_cpu_ms_per_message"] <= TARGET_PERSISTER_MS,
        "rabbit_bytes<=1.1x": summary.get("rabbit_received_per_email_byte") is not None
        and summary["rabbit_received_per_email_byte"] <= TARGET_RABBIT_RATIO,
    }
    if "skipped" in default:
        summary["mbsync_skipped"] = default["skipped"]
    return summary


def print_report(s: dict[str, Any], timeline: list[tuple[float, int, int]]) -> None:
    m = s["machine"]
    print()
    print("== initial sync through the whole pipeline ==")
    print(f"machine        {m['nproc']} CPUs ({m['cpu']}), {m['memory_gb']} GB RAM, "
          f"Linux {m['kernel']}, Python {m['python']}; load {m['load_1min']} at the start")
    print(f"date           {s['date']}")
    print(f"versions       Dovecot {s['versions']['dovecot']}, PostgreSQL "
          f"{s['versions']['postgresql']}, {s['versions']['mbsync'] or 'no mbsync'}")
    print(f"mailbox        {s['messages']} messages, {s['total_mb']} MB (median "
          f"{s['median_kb']} KB, largest {s['max_mb']} MB; {s['kinds']}; "
          f"{s['unicode_subjects']} RFC 2047 subjects); written in {s['fill_seconds']} s")
    print(f"services       {s['fetchers']} fetcher(s), {s['persisters']} persister(s), 1 notifier")
    print(f"pipeline       {s['pipeline_seconds']} s publish->done "
          f"({s['pipeline_seconds_cli']} s for the whole `mailferry sync --wait` command; "
          f"command queued {s['queue_wait_seconds']} s)")
    print(f"throughput     {s['messages_per_second']} messages/s, {s['mb_per_second']} MB/s")
    print(f"parsed         every message {s['parsed_after_seconds']} s after the sync "
          "(the persisters' parse step)")
    print(f"searchable     every message {s['search_indexed_after_seconds']} s after the sync "
          "(the persisters' background indexer)")
    print(f"stored         {s['stored_messages']} messages, {s['stored_placements']} placements, "
          f"{s['stored_raw_mb']} MB raw, {s['with_parse_errors']} with parse errors; "
          f"database {s['database_mb']} MB -> {'OK' if s['pipeline_ok'] else 'WRONG'}")
    print("peak memory    " + ", ".join(f"{k} {v} MB" for k, v in s["peak_memory_mb"].items()))
    print("CPU time       " + ", ".join(f"{k} {v} s" for k, v in s["cpu_seconds"].items()))
    during = s["cpu_during_sync"]
    print(f"CPU in sync    machine {during['machine_busy_percent']}% busy; seconds by program: "
          + ", ".join(f"{k} {v}" for k, v in during["by_program"].items()))
    print(f"backlog        persister queue peaked at {s['persister_peak_backlog']} events")
    print(f"persister CPU  {s['persister_cpu_ms_per_message']} ms per message during the sync "
          f"(target <= {TARGET_PERSISTER_MS})")
    if "persister_cpu_ms_per_message_after_sync" in s:
        print(f"               + {s['persister_cpu_ms_per_message_after_sync']} ms per message "
              "after it (parse step and search index) = "
              f"{s['persister_cpu_ms_per_message_whole']} ms for the whole job; after the sync: "
              + ", ".join(f"{k} {v}" for k, v in s["cpu_after_sync"]["by_program"].items()))
    for service, threads in s.get("persister_threads_during_sync", {}).items():
        print(f"               {service} by thread during the sync (CPU s): "
              + ", ".join(f"{k} {v}" for k, v in threads.items()))
    if "rabbit_received_bytes" in s:
        print(f"RabbitMQ       took in {_mb(s['rabbit_received_bytes'])} MB on the vhost = "
              f"{s['rabbit_received_per_email_byte']} x the mail (target <= {TARGET_RABBIT_RATIO}); "
              f"beam.smp wrote {_mb(s['rabbit_disk_written_bytes'])} MB to disk during the sync "
              f"({s['rabbit_disk_written_per_email_byte']} x; "
              f"{s['rabbit_disk_written_per_email_byte_later']} x once idle; "
              "machine-wide, other vhosts included)")
    if "fetcher_seconds" in s:
        print(f"fetcher        sync.fetched after {s['fetcher_seconds']} s")
    if "persister_busy_seconds" in s:
        print(f"persister busy {s['persister_busy_seconds']} (seconds per event type)")
    for service, shares in s.get("profile_seconds", {}).items():
        print(f"profile        {service}, main thread, seconds (py-spy, idle included):")
        for activity, seconds in shares.items():
            print(f"               {seconds:7.2f}  {activity}")
    print("progress       " + "  ".join(f"{t}s:q{d}/{n}" for t, d, n in timeline))
    if "mbsync_seconds" in s:
        print(f"mbsync         {s['mbsync_seconds']} s (median of {s['mbsync_all_seconds']}) "
              "with its default FSync yes, "
              f"{s['mbsync_messages']} messages, peak {s['mbsync_memory_mb']} MB -> "
              f"{'OK' if s['mbsync_ok'] else 'WRONG'}")
        if "mbsync_nofsync_seconds" in s:
            print(f"               {s['mbsync_nofsync_seconds']} s (median of "
                  f"{s['mbsync_nofsync_all_seconds']}) with FSync no")
        print(f"ratio          pipeline / mbsync = {s['ratio']} (target <= {TARGET_RATIO:g}: "
              f"{'met' if s['target_met'] else 'NOT met'})")
        if "ratio_nofsync" in s:
            print(f"               pipeline / mbsync FSync no = {s['ratio_nofsync']} "
                  f"({'met' if s['target_met_nofsync'] else 'NOT met'})")
    elif "mbsync_skipped" in s:
        print(f"mbsync         skipped: {s['mbsync_skipped']}")
    print("issue 11       " + ", ".join(f"{k} {'met' if v else 'NOT met'}"
                                       for k, v in s["issue11_targets"].items()))
    print()
    print(json.dumps(s, ensure_ascii=False, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = machine()
    work = Path(tempfile.mkdtemp(prefix="mailferry-bench-"))
    ok = False
    try:
        with Dovecot(work / "dovecot") as server:
            server.add_user(USER, PASSWORD)
            corpus = mail.Written()
            factory = mail.MessageFactory(args.seed, datetime.now(UTC))
            started = time.monotonic()
            server.fill_maildir(USER, "INBOX", mail.generate(factory, args.messages, corpus))
            fill_seconds = time.monotonic() - started
            # Let Dovecot index the new files once, so neither contender pays for it.
            with server.session(USER) as client:
                client.select_folder("INBOX", readonly=True)
                uids = client.search(["ALL"])
                seen = sum(len(client.fetch(uids[i:i + 5000], ["FLAGS", "RFC822.SIZE"]))
                           for i in range(0, len(uids), 5000))
            if seen != corpus.count:
                raise RuntimeError(f"Dovecot sees {seen} messages, {corpus.count} written")
            print(f"{corpus.count} messages, {_mb(corpus.total_bytes)} MB written to Dovecot in "
                  f"{fill_seconds:.1f} s", flush=True)

            pipeline = run_pipeline(args, server, work, corpus)
            mbsyncs: dict[str, dict[str, Any]] = {}
            if not args.no_mbsync:
                print("mbsync ...", flush=True)
                mbsyncs["default"] = run_mbsync(server, work, corpus.count, fsync=True,
                                                runs=args.mbsync_runs)
                if "skipped" not in mbsyncs["default"]:
                    mbsyncs["nofsync"] = run_mbsync(server, work, corpus.count, fsync=False,
                                                    runs=args.mbsync_runs)
        summary = summarise(args, host, corpus, fill_seconds, pipeline, mbsyncs)
        print_report(summary, pipeline["timeline"])
        ok = summary["pipeline_ok"] and summary.get("mbsync_ok", True)
        for run in mbsyncs.values():
            if run.get("returncode"):
                print(f"mbsync failed: {run['stderr']}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
