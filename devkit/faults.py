"""Helpers of the fault tests: the store compared with the server, and faults to inject into the
real services (processes killed or frozen, broker connections closed, database backends
terminated). No mocks: every fault is one an operator could meet in production."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.rows import dict_row

from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot

# (folder raw name, uid) -> (sha256 hex of the raw bytes, sorted flags without \Recent)
State = dict[tuple[str, int], tuple[str | None, tuple[str, ...]]]


# -- the store against the server ---------------------------------------------------------------


def server_state(server: Dovecot, user: str, folders: Sequence[str]) -> State:
    """What the server holds in ``folders``, read over IMAP (BODY.PEEK[]: nothing marked read)."""
    state: State = {}
    with server.session(user) as imap:
        for folder in folders:
            if not imap.folder_exists(folder):
                continue
            info = imap.select_folder(folder, readonly=True)
            if not info[b"EXISTS"]:
                continue
            uids = imap.search("ALL")
            for start in range(0, len(uids), 1000):
                chunk = uids[start:start + 1000]
                for uid, data in imap.fetch(chunk, ["BODY.PEEK[]", "FLAGS"]).items():
                    flags = tuple(sorted(f.decode() if isinstance(f, bytes) else str(f)
                                         for f in data[b"FLAGS"] if f not in (b"\\Recent",)))
                    state[(folder, uid)] = (hashlib.sha256(data[b"BODY[]"]).hexdigest(), flags)
    return state


def stored_state(database_url: str, mailbox_id: int, folders: Sequence[str]) -> State:
    """What PostgreSQL holds for the same folders: live placements (message_folders), the
    digest of the bytes actually stored in raw_messages (recomputed, not the key column)."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        rows = conn.execute(
            """SELECT f.raw_name AS folder, mf.uid, mf.flags,
                      encode(sha256(r.data), 'hex') AS sha256
                 FROM message_folders mf
                 JOIN folders f ON f.id = mf.folder_id
                 LEFT JOIN messages g ON g.id = mf.message_id
                 LEFT JOIN raw_messages r ON r.sha256 = g.sha256
                WHERE f.mailbox_id = %s AND mf.expunged_at IS NULL AND f.raw_name = ANY(%s)""",
            (mailbox_id, list(folders)),
        ).fetchall()
    return {(r["folder"], r["uid"]): (r["sha256"], tuple(sorted(r["flags"]))) for r in rows}


def store_duplicates(database_url: str, mailbox_id: int) -> dict[str, int]:
    """Counts that must be zero: parsed messages or raw bytes stored more than once, and live
    placements of one (folder, uid) under two UIDVALIDITYs."""
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        row = conn.execute(
            """SELECT
                 (SELECT count(*) - count(DISTINCT sha256) FROM messages
                   WHERE mailbox_id = %(mb)s) AS duplicate_messages,
                 (SELECT count(*) FROM raw_messages WHERE sha256 <> sha256(data))
                   AS corrupt_raw,
                 (SELECT count(*) FROM (
                     SELECT mf.folder_id, mf.uid FROM message_folders mf
                       JOIN folders f ON f.id = mf.folder_id
                      WHERE f.mailbox_id = %(mb)s AND mf.expunged_at IS NULL
                      GROUP BY mf.folder_id, mf.uid HAVING count(*) > 1) d)
                   AS duplicate_placements""",
            {"mb": mailbox_id},
        ).fetchone()
    assert row is not None
    return dict(row)


def assert_store_equals_server(server: Dovecot, user: str, database_url: str, mailbox_id: int,
                               folders: Sequence[str]) -> int:
    """No message lost, none duplicated, every byte and flag as on the server. Returns how many
    messages the folders hold."""
    expected = server_state(server, user, folders)
    stored = stored_state(database_url, mailbox_id, folders)
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        differ = sorted(k for k in set(stored) & set(expected) if stored[k] != expected[k])
        raise AssertionError(
            f"the store differs from the server: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(extra)} not on the server (e.g. {extra[:5]}), {len(differ)} with other "
            "bytes or flags (e.g. "
            + ", ".join(f"{k}: store {(stored[k][0] or '-')[:8]} {list(stored[k][1])} "
                        f"server {(expected[k][0] or '-')[:8]} {list(expected[k][1])}"
                        for k in differ[:5]) + ")")
    duplicates = store_duplicates(database_url, mailbox_id)
    assert duplicates == {"duplicate_messages": 0, "corrupt_raw": 0, "duplicate_placements": 0}
    return len(expected)


# -- mail and mailboxes -------------------------------------------------------------------------

def fill(server: Dovecot, user: str, folder: str, numbers: Iterable[int], rng: random.Random,
         flags: Sequence[str] = ()) -> int:
    """Write generated messages straight into the Maildir (thousands per second)."""
    now = datetime.now(UTC)
    return server.fill_maildir(
        user, folder, ((mail.plain_message(n, rng, rng.randint(1500, 4500)), now, flags)
                       for n in numbers))


def add_mailbox(env: dict[str, str], host: str, port: int, user: str, password: str,
                folders: Sequence[str], owner: str = "owner@example.com") -> int:
    added_user = services.run_cli(["user", "add", "--email", owner], env)
    assert added_user.returncode == 0, added_user.stderr
    added = services.run_cli(
        ["mailbox", "add", "--owner", owner, "--host", host, "--port", str(port), "--security",
         "none", "--username", user, "--password-stdin", "--folders", ",".join(folders)],
        env, stdin=f"{password}\n".encode())
    assert added.returncode == 0, added.stderr
    return int(json.loads(added.stdout)["id"])


def request_sync(env: dict[str, str], mailbox_id: int, force: bool = False) -> str:
    """Ask for a sync without waiting; returns the run id."""
    args = ["sync", "--mailbox", str(mailbox_id), "--json", *(["--force"] if force else [])]
    result = services.run_cli(args, env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)[0]
    assert out["status"] == "queued", out
    return str(out["run_id"])


def run_row(database_url: str, run_id: str) -> dict[str, Any]:
    """The run, read on a fresh connection (a test may be terminating backends)."""
    for attempt in range(5):
        try:
            with psycopg.connect(database_url, row_factory=dict_row, connect_timeout=10) as conn:
                row = conn.execute("SELECT * FROM sync_runs WHERE id = %s", (run_id,)).fetchone()
                assert row is not None, f"no run {run_id}"
                return dict(row)
        except psycopg.OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def wait_for_run(database_url: str, run_id: str, procs: services.ServiceProcesses,
                 timeout: float = 240) -> dict[str, Any]:
    """Wait until the run is no longer queued or running; returns its row."""
    final = services.eventually(
        lambda: (row if (row := run_row(database_url, run_id))["status"]
                 not in ("queued", "running") else None),
        timeout=timeout, interval=0.5)
    assert final, (f"run {run_id} still {run_row(database_url, run_id)['status']} "
                   f"after {timeout}s\n{procs.logs()}")
    return final


def sql(database_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


# -- processes ----------------------------------------------------------------------------------


def alive(procs: services.ServiceProcesses, service: str) -> list[services.Proc]:
    return [p for name, p in procs.processes if name == service and p.poll() is None]


def kill9(process: services.Proc) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def log_lines(log_dir: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines (MAILFERRY_LOG_FORMAT=json) of one process (``fetcher-0``, the first
    fetcher started) or of every process of a service (``fetcher``)."""
    one = log_dir / f"{name}.log"
    out = []
    for path in [one] if one.exists() else sorted(log_dir.glob(f"{name}-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- RabbitMQ -----------------------------------------------------------------------------------


def broker_connections(vhost: str) -> list[dict[str, Any]]:
    result = services.rabbit_api("GET", f"/vhosts/{quote(vhost, safe='')}/connections")
    assert isinstance(result, list)
    return result


def close_broker_connections(vhost: str, pid: int | None = None) -> int:
    """Close the AMQP connections of the vhost (only process ``pid``'s when given), as the
    broker does to a peer it lost; returns how many were closed."""
    ports = local_ports(pid) if pid is not None else None
    closed = 0
    for connection in broker_connections(vhost):
        if ports is not None and connection.get("peer_port") not in ports:
            continue
        try:
            services.rabbit_api("DELETE", f"/connections/{quote(connection['name'], safe='')}")
            closed += 1
        except Exception:  # already gone
            continue
    return closed


def queue_depth(vhost: str, queue: str) -> int:
    messages = services.queue_info(vhost, queue).get("messages")
    return int(messages) if isinstance(messages, int) else 0


# -- PostgreSQL ---------------------------------------------------------------------------------


def terminate_backends(database_url: str) -> int:
    """Terminate every session on the test's database, as an operator (or a failover) does."""
    name = database_url.rpartition("/")[2]
    with psycopg.connect(services.PG_ADMIN_URL, autocommit=True) as admin:
        rows = admin.execute(
            """SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
                WHERE datname = %s AND pid <> pg_backend_pid()""",
            (name,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)
