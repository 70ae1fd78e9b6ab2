"""Private PostgreSQL databases and RabbitMQ vhosts for tests, and the services as processes.

Each test gets its own database and vhost (created and dropped here), because CI runs on the same
machine as a developer's session and several test runs may share the servers.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from cryptography.fernet import Fernet

from mailferry.devkit import forkserver

PG_ADMIN_URL = os.environ.get("MAILFERRY_TEST_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
RABBIT_AMQP = os.environ.get("MAILFERRY_TEST_RABBIT_AMQP", "amqp://guest:guest@127.0.0.1:5672")
RABBIT_API = os.environ.get("MAILFERRY_TEST_RABBIT_API", "http://127.0.0.1:15672/api")
RABBIT_USER = os.environ.get("MAILFERRY_TEST_RABBIT_USER", "guest")
RABBIT_PASSWORD = os.environ.get("MAILFERRY_TEST_RABBIT_PASSWORD", "guest")
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
#: A service process: forked by the devkit's fork server, or a new interpreter.
Proc = subprocess.Popen[bytes] | forkserver.Process


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextmanager
def private_database(template: str | None = None) -> Iterator[str]:
    name = f"mf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        if template:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(PG_ADMIN_URL, name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def deployment_env(database_url: str, broker_url: str, secret_key: str | None = None,
                   fast: bool = True, **overrides: str) -> dict[str, str]:
    """The MAILFERRY_* environment of one isolated deployment on loopback. ``fast`` (tests):
    short ticks, delays and leases, so that tests wait seconds, not minutes; without it
    (benchmarks) the production defaults. ``overrides`` by variable name."""
    quick = {
        "MAILFERRY_SCHEDULER_TICK": "1",
        "MAILFERRY_RETRY_DELAYS": "1,2,4",
        "MAILFERRY_LEASE_SECONDS": "10",
        "MAILFERRY_NOTIFIER_TICK": "0.5",
        "MAILFERRY_NOTIFY_RETRY_BASE": "1",
        # Tests written before push count connections, commands and runs: a watch would add
        # its own. Push tests turn it on (MAILFERRY_PUSH=1).
        "MAILFERRY_PUSH": "0",
    }
    return {
        "MAILFERRY_DATABASE_URL": database_url,
        "MAILFERRY_BROKER_URL": broker_url,
        "MAILFERRY_SECRET_KEY": secret_key or Fernet.generate_key().decode(),
        "MAILFERRY_ALLOW_PRIVATE_NETWORKS": "1",
        "MAILFERRY_LOG_FORMAT": "json",
        **(quick if fast else {}),
        **overrides,
    }


def readme_example(heading: str) -> str:
    """The first Python block under a README heading: examples people copy must run."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"## {heading}", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"the README section {heading!r} has no Python example"
    return match.group(1)


def rabbit_api(method: str, path: str, body: Mapping[str, object] | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{RABBIT_API}{path}", data=data, method=method)
    token = base64.b64encode(f"{RABBIT_USER}:{RABBIT_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


@contextmanager
def private_vhost() -> Iterator[tuple[str, str]]:
    """(vhost name, AMQP URL for it)."""
    vhost = f"mf-test-{uuid.uuid4().hex[:12]}"
    rabbit_api("PUT", f"/vhosts/{quote(vhost, safe='')}", {})
    rabbit_api("PUT", f"/permissions/{quote(vhost, safe='')}/{quote(RABBIT_USER, safe='')}",
               {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield vhost, f"{RABBIT_AMQP}/{quote(vhost, safe='')}"
    finally:
        rabbit_api("DELETE", f"/vhosts/{quote(vhost, safe='')}")


def queue_info(vhost: str, queue: str) -> dict[str, object]:
    result = rabbit_api("GET", f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
    assert isinstance(result, dict)
    return result


class ServiceProcesses:
    """The services as separate OS processes (``mailferry <service>``), as in production."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.processes: list[tuple[str, Proc]] = []

    def start(self, service: str, count: int = 1, env: Mapping[str, str] | None = None) -> None:
        """``count`` processes of ``service``; ``env`` adds to the deployment's environment
        (e.g. its own ``MAILFERRY_METRICS_PORT``)."""
        for _ in range(count):
            index = sum(1 for name, _ in self.processes if name == service)
            log = self.log_dir / f"{service}-{index}.log"
            full_env = {**self.env, **(env or {})}
            if forkserver.enabled():
                self.processes.append((service, forkserver.spawn([service], full_env, REPO, log)))
                continue
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "mailferry.services.cli.main", service],
                    env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            self.processes.append((service, process))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def assert_running(self) -> None:
        dead = [(n, p.returncode) for n, p in self.processes if p.poll() is not None]
        assert not dead, f"services exited: {dead}\n{self.logs()}"

    def peak_rss(self, service: str, index: int = 0) -> int:
        """Bytes: the process's resident-set high-water mark (``VmHWM``) so far."""
        process = [p for name, p in self.processes if name == service][index]
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmHWM for {service} (pid {process.pid})")

    def stop(self) -> None:
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _, process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def mailbox_row(conn: Any, *, name: str = "m", owner: int | None = None,
                username: str = "u", host: str = "h", lease_token: int = 1) -> int:
    """A mailbox row straight in the store (no password: ``\\x00``), for tests of what reads
    or writes the store without going through the CLI."""
    row = conn.execute(
        """INSERT INTO mailboxes (owner_id, name, host, port, security, username,
                                  password_encrypted, lease_token)
           VALUES (%s, %s, %s, 993, 'ssl', %s, '\\x00', %s) RETURNING id""",
        (owner, name, host, username, lease_token)).fetchone()
    assert row is not None
    return int(row["id"])


def run_cli(args: list[str], env: Mapping[str, str], stdin: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """``mailferry ARGS...`` in a process of its own, forked from a process that has imported
    the CLI already (devkit/forkserver.py) when MAILFERRY_DEVKIT_FORK=1 (the tests), else a new
    interpreter."""
    if forkserver.enabled():
        return forkserver.run(args, {**os.environ, **env}, REPO, stdin, timeout)
    return subprocess.run(
        [sys.executable, "-m", "mailferry.services.cli.main", *args],
        env={**os.environ, **env}, input=stdin, capture_output=True, timeout=timeout, cwd=REPO,
    )


def cli_json(args: list[str], env: dict[str, str], stdin: bytes | None = None,
         timeout: float = 300) -> Any:
    """Run the mailferry CLI and return its JSON output; any failure stops the benchmark."""
    result = run_cli(args, env, stdin=stdin, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"mailferry {' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(result.stdout)


def cli(env: dict[str, str], *args: str, stdin: bytes | None = None) -> Any:
    """``mailferry ARGS...``'s JSON output, the way tests write it; a failure raises."""
    return cli_json(list(args), env, stdin=stdin)


def eventually(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll until ``check`` returns something truthy (the pipeline is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def parse_stored(conn: Any) -> int:
    """Run the persisters' parse step here until no stored message is left unparsed (what a
    persister's thread does after a first sync, shared/parsing.py); returns how many. For
    tests that call the persister's handler directly, without its threads."""
    from mailferry import parsing

    done = 0
    while n := parsing.parse_pending(conn):
        done += n
    return done


def wait_parsed(database_url: str, mailbox_id: int | None = None,
                timeout: float = 120.0) -> None:
    """Wait until the running persisters have parsed every stored message (of the mailbox): a
    first sync counts a message as synced once its raw bytes are stored, and fills its subject,
    addresses and bodies right after (shared/parsing.py). Fails after ``timeout``."""
    from mailferry import db, parsing

    with db.connect(database_url, autocommit=True) as conn:
        done = eventually(lambda: parsing.unparsed(conn, mailbox_id) == 0, timeout=timeout)
        assert done, f"{parsing.unparsed(conn, mailbox_id)} messages unparsed after {timeout} s"


def free_port() -> int:
    """A loopback port nobody listens on (for "connection refused" cases and late servers)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
