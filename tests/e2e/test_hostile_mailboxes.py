"""Hostile IMAP servers queued beside a healthy mailbox, through the whole pipeline (the services
as processes, real RabbitMQ and PostgreSQL, a real Dovecot for the healthy mailbox, one
``devkit/hostile_imap.py`` server per hostile mailbox).

DESIGN invariant 9: a server is untrusted input, so every attempt has bounded time and bounded
memory, and one hostile or broken server fails its own run and nothing else. Here that means:

- the healthy mailbox, queued behind every hostile one, is stored exactly (store == Dovecot)
  within its time alone plus at most one sync deadline (and a small margin);
- every hostile run ends, failed or done, with an error kind that says what happened;
- each fetcher's peak RSS (VmHWM) stays under 300 MB with the default memory limits, although
  one server sends an 80 MiB literal behind ``RFC822.SIZE 100`` and another a 93 GiB one;
- none of this is taken for refused credentials (no ``CredentialsInvalid`` is published).

Deadlines are small (command 3 s, attempt 10 s, retries after 1 s and 1 s) so the test takes
about a minute; the memory limits are the defaults.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailferry import db
from mailferry.devkit import faults, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.hostile_imap import HostileImapServer, MiB
from mailferry.topology import NOTIFIER

COMMAND_TIMEOUT = 3.0
SYNC_DEADLINE = 10.0
RETRY_DELAYS = (1.0, 1.0)
HEALTHY_MESSAGES = 300
MAX_FETCHER_RSS_MB = 300
MARGIN = 5.0  # seconds: process scheduling on 2 shared cores, the persister's last commit

HOSTILE_ENV = {
    "MAILFERRY_IMAP_TIMEOUT": str(COMMAND_TIMEOUT),
    "MAILFERRY_IMAP_COMMAND_TIMEOUT": str(COMMAND_TIMEOUT),
    "MAILFERRY_SYNC_DEADLINE": str(SYNC_DEADLINE),
    "MAILFERRY_RETRY_DELAYS": ",".join(f"{d:g}" for d in RETRY_DELAYS),
    # The fake servers date their mail 2024-01-15: a first sync must reach back that far.
    "MAILFERRY_FIRST_SYNC_DAYS": "36500",
}
# Every attempt ends by its deadline; a transient failure is tried len(RETRY_DELAYS) more times.
HOSTILE_BOUND = (len(RETRY_DELAYS) + 1) * SYNC_DEADLINE + sum(RETRY_DELAYS) + MARGIN


@dataclass(frozen=True)
class Hostile:
    behaviour: str
    status: str  # how its run ends
    error_kinds: frozenset[str | None]  # the run's error_kind
    error: str = ""  # a regular expression the run's error matches
    options: dict[str, Any] = field(default_factory=dict)  # HostileImapServer(...)
    messages: int = 2


HOSTILES = (
    # Dripped bytes never complete LIST: cut at the command deadline, on every attempt.
    Hostile("slow_drip", "failed", frozenset({"timeout"}), r"no complete answer within 3s",
            {"drip_interval": 0.5}),
    # A literal of {99999999999} in the metadata FETCH: read and dropped until the deadline;
    # the connection is gone, so the attempt is retried, and the run fails with the timeout.
    Hostile("garbage_literal", "failed", frozenset({"timeout"}),
            r"no complete answer within 3s", messages=1),
    # 80 MiB behind RFC822.SIZE 100: read and dropped, recorded with skipped_reason.
    Hostile("lying_size", "done", frozenset({None}), "", {"literal_bytes": 80 * MiB},
            messages=1),
    # LIST never ends: stopped by the byte cap (or the deadline, whichever comes first).
    Hostile("endless_list", "failed", frozenset({"protocol", "timeout"}),
            r"exceeded \d+ bytes|no complete answer within 3s"),
    # BYE to every EXAMINE: a lost connection, retried, then the run fails with it.
    Hostile("bye_mid_command", "failed", frozenset({"connection"}), r"shutting down",
            {"bye_times": 1000}),
    # Half a literal, then the socket closes: a lost connection, retried, then the run fails.
    Hostile("disconnect_mid_literal", "failed", frozenset({"connection"}),
            r"connection lost|EOF"),
    # One 50 MB line without CRLF: stopped at the 8 MiB line cap, not retried (permanent).
    Hostile("long_line", "failed", frozenset({"protocol"}), r"line longer than 8388608 bytes"),
)


@pytest.fixture
def hostile_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, **HOSTILE_ENV}


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as server:
        rng = random.Random(9)
        for user in ("solo", "crowd"):  # the same mail twice: one synced alone, one in a crowd
            server.add_user(user, "pw")
            faults.fill(server, user, "INBOX", range(HEALTHY_MESSAGES), rng)
        yield server


@pytest.fixture
def procs(hostile_env: dict[str, str], tmp_path: Path) -> Iterator[services.ServiceProcesses]:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    processes = services.ServiceProcesses(hostile_env, log_dir)
    yield processes
    processes.stop()


def _add_mailbox(env: dict[str, str], host: str, port: int, user: str, password: str) -> int:
    return int(services.cli(env, "mailbox", "add", "--owner", "owner@example.com", "--host", host,
                    "--port", str(port), "--security", "none", "--username", user,
                    "--password-stdin", "--folders", "INBOX", "--name", user,
                    stdin=f"{password}\n".encode())["id"])


def _runs(conn: db.Connection, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT * FROM sync_runs WHERE id = ANY(%s::uuid[])",
                        (run_ids,)).fetchall()
    return {str(r["id"]): r for r in rows}


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the highest resident set size the process ever had (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def _seconds(run: dict[str, Any]) -> float:
    elapsed: timedelta = run["finished_at"] - run["requested_at"]
    return elapsed.total_seconds()


@pytest.mark.early
def test_hostile_servers_fail_their_own_runs_in_bounded_time_and_memory_and_nobody_else_waits(
    hostile_env: dict[str, str], dovecot: Dovecot, conn: db.Connection, vhost: tuple[str, str],
    procs: services.ServiceProcesses,
) -> None:
    env = hostile_env
    services.cli(env, "user", "add", "--email", "owner@example.com")
    solo = _add_mailbox(env, dovecot.host, dovecot.port, "solo", "pw")
    crowd = _add_mailbox(env, dovecot.host, dovecot.port, "crowd", "pw")
    procs.start("fetcher", 2)
    procs.start("persister", 2)

    # The healthy mailbox's time alone, with the same services.
    [alone] = services.cli(env, "sync", "--mailbox", str(solo), "--wait", "--timeout", "60", "--json")
    assert alone["status"] == "done", procs.logs()
    baseline = _seconds(_runs(conn, [str(alone["run_id"])])[str(alone["run_id"])])

    servers = [HostileImapServer(h.behaviour, messages=h.messages, stream_deadline=60,
                                 idle_timeout=60, **h.options) for h in HOSTILES]
    try:
        for server in servers:
            server.start()
        hostile_ids = [_add_mailbox(env, s.host, s.port, s.behaviour, "pw") for s in servers]
        # One command each, hostile ones first: the healthy mailbox queues behind all of them.
        requested = services.cli(env, "sync", *[a for i in (*hostile_ids, crowd)
                                        for a in ("--mailbox", str(i))], "--json")
        run_of = {r["mailbox_id"]: str(r["run_id"]) for r in requested}
        assert all(r["status"] == "queued" for r in requested), requested

        def all_ended() -> dict[str, dict[str, Any]] | None:
            runs = _runs(conn, list(run_of.values()))
            return None if any(r["status"] in ("queued", "running")
                               for r in runs.values()) else runs

        runs = services.eventually(all_ended, timeout=HOSTILE_BOUND + 15, interval=0.25)
        procs.assert_running()
        peaks = {p.pid: _peak_rss_mb(p.pid) for name, p in procs.processes if name == "fetcher"}
    finally:
        for server in servers:
            server.stop()
    assert runs, f"runs still active: {_runs(conn, list(run_of.values()))}\n{procs.logs()}"

    # The healthy mailbox: complete, exact, and delayed by at most one sync deadline.
    healthy = runs[run_of[crowd]]
    assert healthy["status"] == "done", (healthy, procs.logs())
    assert faults.assert_store_equals_server(dovecot, "crowd", env["MAILFERRY_DATABASE_URL"],
                                             crowd, ["INBOX"]) == HEALTHY_MESSAGES
    assert _seconds(healthy) <= baseline + SYNC_DEADLINE + MARGIN, (
        f"alone {baseline:.1f}s, behind the hostile servers {_seconds(healthy):.1f}s")

    # Every hostile run ended, within its bound, saying why.
    outcomes = {h.behaviour: runs[run_of[i]] for h, i in zip(HOSTILES, hostile_ids, strict=True)}
    for hostile in HOSTILES:
        run = outcomes[hostile.behaviour]
        seen = (hostile.behaviour, run["status"], run["error_kind"], run["error"])
        assert run["status"] == hostile.status, seen
        assert run["error_kind"] in hostile.error_kinds, seen
        assert re.search(hostile.error, run["error"] or ""), seen
        assert _seconds(run) <= HOSTILE_BOUND, (seen, _seconds(run))

    # The lying server's message: recorded without its bytes, with the reason.
    lying = hostile_ids[[h.behaviour for h in HOSTILES].index("lying_size")]
    [recorded] = services.cli(env, "messages", "list", "--mailbox", str(lying), "--json")
    assert recorded["skipped_reason"] == f"larger than {64 * MiB} bytes", recorded
    assert (recorded["sha256"], recorded["size"]) == (None, 80 * MiB), recorded

    # Memory: bounded by the limits on bytes received, whatever the servers declared or sent.
    assert peaks and max(peaks.values()) <= MAX_FETCHER_RSS_MB, peaks

    # Not one of these is a refused login: nothing for the notifier, no mailbox marked invalid.
    assert faults.queue_depth(vhost[0], NOTIFIER.name) == 0
    assert conn.execute("SELECT count(*) AS n FROM mailboxes WHERE credentials_invalid_at "
                        "IS NOT NULL OR last_error_kind = 'auth'").fetchone() == {"n": 0}
    print(f"healthy alone {baseline:.1f}s, in the crowd {_seconds(healthy):.1f}s; "
          + ", ".join(f"{b} {r['status']}/{r['error_kind']} {_seconds(r):.1f}s"
                      for b, r in outcomes.items())
          + f"; fetcher peak RSS {sorted(round(v) for v in peaks.values())} MB")
