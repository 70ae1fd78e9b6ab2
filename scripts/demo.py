#!/usr/bin/env python3
"""``make demo``: the main job of mailferry, end to end, on one machine, in about a minute.

A newcomer should see a real mailbox being synchronized by the real services before reading any
code, so this script sets up everything the services need and nothing they would share with other
work on the machine:

- a database ``mailferry_demo`` (dropped and created again on every run) on the local PostgreSQL,
  and a RabbitMQ vhost ``mailferry-demo`` (deleted and created again), so other databases and vhosts
  are never touched;
- a private Dovecot IMAP server under ``.demo/dovecot`` (``mailferry.devkit.dovecot``, the harness of
  the tests) holding about 200 generated messages, some with attachments, some \\Seen, in INBOX,
  Sent and the non-ASCII nested folder "Projets/Été", plus 20 messages older than a year that the
  first sync must skip and an "Archive" folder that is only synchronized once enabled;
- the operator steps through the ``mailferry`` CLI, exactly as a person would type them, and the
  four services under ``mailferry up``.

The services keep running until Ctrl-C so the reader can try the CLI and the RabbitMQ management UI
against them; ``--no-wait`` stops everything right after the summary (smoke tests, CI).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from cryptography.fernet import Fernet

from mailferry.crypto import generate_key
from mailferry.devkit import mail, measure
from mailferry.devkit.dovecot import Dovecot, DovecotError
from mailferry.devkit.services import rabbit_api
from mailferry.topology import WORK_QUEUES

REPO = Path(__file__).resolve().parents[1]

DEMO_DIR = REPO / ".demo"
SECRET_KEY_FILE = DEMO_DIR / "secret_key"
SERVICES_LOG = DEMO_DIR / "services.log"
SERVICES_PID_FILE = DEMO_DIR / "services.pid"
LOCK_FILE = DEMO_DIR / "demo.lock"
DOVECOT_DIR = DEMO_DIR / "dovecot"

DATABASE = "mailferry_demo"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
VHOST = "mailferry-demo"
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
RABBIT_USER = RABBIT_PASSWORD = "guest"
RABBIT_API = "http://127.0.0.1:15672/api"
MANAGEMENT_UI = "http://localhost:15672"

IMAP_USER = IMAP_PASSWORD = "demo"
OWNER_EMAIL = "demo@example.com"
# Folders the mailbox is registered with (the first sync takes their last year), how many recent
# and how many year-old messages each gets; "Archive" and "Drafts" exist but are not selected.
SYNCED = {"INBOX": (100, 10), "Sent": (50, 5), "Projets/Été": (50, 5)}
UNSELECTED = {"Archive": 12, "Drafts": 2}
FETCHERS = PERSISTERS = 2
SYNC_TIMEOUT = 180


class DemoError(Exception):
    """A step failed; the message says what to do about it (no traceback for expected failures)."""


class _Stop(BaseException):
    """SIGTERM to the demo: unwind exactly like Ctrl-C so everything started is stopped."""


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def note(text: str) -> None:
    print(f"    {text}", flush=True)


# --- preflight --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """Where the demo database lives: the local server, or the one MAILFERRY_DATABASE_URL names.

    Only the server and credentials of MAILFERRY_DATABASE_URL are used; the database is always
    ``mailferry_demo``, because the demo drops it on every run and must never drop someone's
    real database just because their shell exports its URL.
    """

    admin_url: str
    url: str

    @classmethod
    def from_environment(cls) -> Database:
        given = os.environ.get("MAILFERRY_DATABASE_URL")
        if not given:
            return cls(PG_ADMIN_URL, _with_database(PG_ADMIN_URL, DATABASE))
        if urlsplit(given).scheme not in ("postgresql", "postgres"):
            raise DemoError(f"MAILFERRY_DATABASE_URL must be a postgresql:// URL, not {given!r}")
        return cls(_with_database(given, "postgres"), _with_database(given, DATABASE))


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_postgres(database: Database) -> None:
    try:
        with psycopg.connect(database.admin_url, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        raise DemoError(
            f"PostgreSQL is not reachable at {_masked(database.admin_url)}: "
            f"{str(exc).strip().splitlines()[0]}\n"
            "    Start it (e.g. `service postgresql start`), or point MAILFERRY_DATABASE_URL at a "
            "server where this user may create databases."
        ) from exc
    note(f"PostgreSQL {version[0] if version else '?'} at {_masked(database.admin_url)}: ok")


def check_rabbitmq() -> None:
    try:
        with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=5):
            pass
    except OSError as exc:
        raise DemoError(
            f"RabbitMQ is not reachable at {AMQP_HOST}:{AMQP_PORT} ({exc}).\n"
            "    Start it (e.g. `service rabbitmq-server start`)."
        ) from exc
    try:
        overview = rabbit_api("GET", "/overview")
    except (urllib.error.URLError, OSError) as exc:
        raise DemoError(
            f"RabbitMQ's management API does not answer at {RABBIT_API} ({exc}).\n"
            "    The demo creates its vhost through it: run `make deps` (or "
            "`rabbitmq-plugins enable rabbitmq_management`) and retry."
        ) from exc
    note(f"RabbitMQ {overview.get('rabbitmq_version', '?')} at {AMQP_HOST}:{AMQP_PORT}, "
         f"management API at {RABBIT_API}: ok")


# --- the demo's own resources -------------------------------------------------------------------


def recreate_database(database: Database) -> None:
    """A fresh database each run: the demo always starts from "nothing synchronized yet"."""
    with psycopg.connect(database.admin_url, autocommit=True, connect_timeout=5) as admin:
        # FORCE: services of an earlier demo run that was killed may still hold connections.
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DATABASE}"')


def recreate_vhost() -> str:
    """A fresh vhost each run, so no command or event of an earlier run is left in a queue."""
    path = quote(VHOST, safe="")
    try:
        rabbit_api("DELETE", f"/vhosts/{path}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
    rabbit_api("PUT", f"/vhosts/{path}", {"description": "mailferry demo (scripts/demo.py)"})
    rabbit_api("PUT", f"/permissions/{path}/{quote(RABBIT_USER, safe='')}",
               {"configure": ".*", "write": ".*", "read": ".*"})
    return f"amqp://{RABBIT_USER}:{RABBIT_PASSWORD}@{AMQP_HOST}:{AMQP_PORT}/{path}"


def secret_key() -> tuple[str, bool]:
    """The session's Fernet key, kept in .demo/secret_key so exports pasted earlier stay valid."""
    with contextlib.suppress(FileNotFoundError, ValueError):  # ValueError: not a Fernet key
        existing = SECRET_KEY_FILE.read_text().strip()
        Fernet(existing)
        return existing, True
    key = generate_key()
    SECRET_KEY_FILE.touch(mode=0o600)
    SECRET_KEY_FILE.write_text(key + "\n")
    return key, False


@contextlib.contextmanager
def single_instance() -> Iterator[None]:
    """Two demos at once would drop each other's database and vhost: refuse the second."""
    with open(LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise DemoError(f"another demo is running (pid {lock.read().strip() or '?'}); "
                            "stop it with Ctrl-C first") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def stop_leftovers() -> None:
    """A demo killed with SIGKILL leaves its services and its Dovecot running: the services would
    join the next demo's fresh database and vhost, and the Dovecot would lose its files. Stop
    them, and only them: a process counts as the demo's when its pid file says so and its
    command line (and, for the services, its broker URL) matches what the demo starts."""
    found = _demo_processes()
    if found:
        step(f"stopping what an earlier demo left running (pids {', '.join(map(str, found))})")
    for pid in found:  # the supervisor first: its children then stop with it
        if not Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 75  # the supervisor gives its children 60 s
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    SERVICES_PID_FILE.unlink(missing_ok=True)


def _demo_processes() -> list[int]:
    def read(path: Path) -> str:
        try:
            return path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    found = []
    dovecot = read(DOVECOT_DIR / "run" / "master.pid").strip()
    if dovecot.isdigit() and str(DOVECOT_DIR / "dovecot.conf") in read(Path(f"/proc/{dovecot}/cmdline")):
        found.append(int(dovecot))
    services = read(SERVICES_PID_FILE).strip()
    # The supervisor, or its children if it was killed too (same process group: its own).
    for proc in Path("/proc").glob("[0-9]*") if services.isdigit() else ():
        stat = read(proc / "stat").rsplit(")", 1)[-1].split()
        if (len(stat) > 2 and stat[2] == services
                and "mailferry.services.cli.main" in read(proc / "cmdline")
                and f"/{VHOST}\0" in read(proc / "environ")):
            found.append(int(proc.name))
    return sorted(found, key=lambda pid: str(pid) != services)  # the supervisor first


# --- generated mail -------------------------------------------------------------------------------

def start_dovecot(stack: contextlib.ExitStack) -> Dovecot:
    shutil.rmtree(DOVECOT_DIR, ignore_errors=True)  # fresh mail: UIDs start at 1 again
    try:
        server = stack.enter_context(Dovecot(DOVECOT_DIR))
    except DovecotError as exc:
        raise DemoError(f"Dovecot did not start: {exc}\n    (`make deps` installs it)") from exc
    step(f"starting Dovecot on {server.host}:{server.port}")
    note(f"files, log and Maildir under {DOVECOT_DIR.relative_to(REPO)}/")
    server.add_user(IMAP_USER, IMAP_PASSWORD)
    rng = random.Random(20240601)  # the same mailbox on every run
    now = datetime.now(UTC)
    for folder, (recent, old) in SYNCED.items():
        written = server.fill_maildir(
            IMAP_USER, folder,
            mail.dated_mail(rng, folder, recent, old, now, owner=OWNER_EMAIL))
        note(f"{folder:<12} {written:>4} messages ({old} of them older than a year)")
    for folder, count in UNSELECTED.items():
        written = server.fill_maildir(
            IMAP_USER, folder,
            mail.dated_mail(rng, folder, count, 0, now, owner=OWNER_EMAIL))
        note(f"{folder:<12} {written:>4} messages (not selected for sync)")
    server.create_folder(IMAP_USER, "Trash")
    note(f"user {IMAP_USER!r}, password {IMAP_PASSWORD!r}")
    return server


# --- the CLI and the services --------------------------------------------------------------------


class Demo:
    """Runs ``mailferry`` as a subprocess with the demo's environment, showing each command."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.supervisor: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str | None = None, capture: bool = False,
            show: bool = True) -> str:
        """``mailferry ARGS``; raises DemoError with the CLI's own message when it fails."""
        if show:
            print(f"$ mailferry {shlex.join(args)}", flush=True)
        result = subprocess.run(
            [sys.executable, "-m", "mailferry.services.cli.main", *args], cwd=REPO, env=self.env,
            input=stdin.encode() if stdin is not None else None,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None, check=False,
        )
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip() if capture else ""
            raise DemoError(f"`mailferry {shlex.join(args)}` exited with {result.returncode}"
                            + (f":\n{detail}" if detail else ""))
        return result.stdout.decode(errors="replace") if capture else ""

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        """``mailferry ARGS`` in the background; its output is shown by :meth:`finish`."""
        return subprocess.Popen(
            [sys.executable, "-m", "mailferry.services.cli.main", *args], cwd=REPO, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def finish(self, process: subprocess.Popen[bytes], args: Sequence[str],
               timeout: float) -> None:
        """Wait for a :meth:`spawn`-ed command, print its output, fail as :meth:`cli` would."""
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            self.check_alive()
            if time.monotonic() > deadline:
                _terminate(process)
                raise DemoError(f"`mailferry {shlex.join(args)}` still running after "
                                f"{timeout:.0f}s; see {SERVICES_LOG}\n" + log_tail())
            time.sleep(0.2)
        out, err = process.communicate()
        print(out.decode(errors="replace"), end="", flush=True)
        if process.returncode != 0:
            raise DemoError(f"`mailferry {shlex.join(args)}` exited with {process.returncode}"
                            f":\n{err.decode(errors='replace').strip()}\n" + log_tail())

    def start_services(self, log: IO[bytes]) -> None:
        # Own session: Ctrl-C in this terminal reaches only the demo, which then stops the
        # supervisor with SIGTERM and waits for it; the children never race the demo's cleanup.
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "mailferry.services.cli.main", "up",
             "--fetchers", str(FETCHERS), "--persisters", str(PERSISTERS)],
            cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        SERVICES_PID_FILE.write_text(f"{self.supervisor.pid}\n")

    def wait_for_consumers(self, timeout: float = 90.0) -> None:
        """Until every work queue has its consumers: then the services are really up.

        Asked over AMQP (a passive declare) rather than the management API, whose consumer
        counts lag by its statistics interval (5 s).
        """
        wanted = {work.name: n for work, n in zip(WORK_QUEUES, (FETCHERS, PERSISTERS, 1),
                                                  strict=True)}
        try:
            seen = measure.wait_for_consumers(self.env["MAILFERRY_BROKER_URL"], wanted, timeout,
                                              check=self.check_alive)
        except RuntimeError as exc:
            raise DemoError(f"{exc}; see {SERVICES_LOG}\n" + log_tail()) from exc
        for name in wanted:
            note(f"{name}: {seen[name]} consumer(s)")

    def check_alive(self) -> None:
        if self.supervisor is not None and self.supervisor.poll() is not None:
            code = self.supervisor.returncode
            self.supervisor = None
            raise DemoError(f"`mailferry up` exited with {code}; see {SERVICES_LOG}\n" + log_tail())

    def stop_services(self) -> None:
        process, self.supervisor = self.supervisor, None
        if process is None or process.poll() is not None:
            return
        step(f"stopping the services (SIGTERM to the supervisor, pid {process.pid})")
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=75)  # the supervisor gives its children 60 s
        except subprocess.TimeoutExpired:
            note("the supervisor did not stop within 75 s; killing its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        SERVICES_PID_FILE.unlink(missing_ok=True)
        note(f"supervisor exited with {code}")


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_run(database_url: str, mailbox_id: int, sync: subprocess.Popen[bytes],
                 timeout: float = 30.0) -> None:
    """Until the background ``sync`` has registered its run (then the scheduler will see it)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        while time.monotonic() < deadline:
            if conn.execute("SELECT 1 FROM sync_runs WHERE mailbox_id = %s",
                            (mailbox_id,)).fetchone():
                return
            if sync.poll() is not None:
                err = sync.communicate()[1].decode(errors="replace").strip()
                raise DemoError(f"`mailferry sync` exited with {sync.returncode}:\n{err}")
            time.sleep(0.1)
    raise DemoError(f"`mailferry sync` registered no run within {timeout:.0f}s")


def run_seconds(database_url: str, mailbox_id: int) -> float:
    """How long the fetcher and persisters took, from the run's own timestamps."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(
            """SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM sync_runs
                WHERE mailbox_id = %s""", (mailbox_id,)).fetchone()
    return float(row[0]) if row and row[0] is not None else float("nan")


def log_tail(lines: int = 15) -> str:
    """The end of services.log for an error message, without the console renderer's colours."""
    try:
        text = SERVICES_LOG.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    text = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text]
    return "    --- last lines of the services' log ---\n" + "\n".join(f"    {t}" for t in text)


def demo_environment(database_url: str, broker_url: str, key: str) -> dict[str, str]:
    """The process environment minus any MAILFERRY_* of the user's shell, plus the demo's own:
    the demo must behave the same whatever the shell exports (e.g. a production database URL)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
    return {
        **base,
        "MAILFERRY_DATABASE_URL": database_url,
        "MAILFERRY_BROKER_URL": broker_url,
        "MAILFERRY_SECRET_KEY": key,
        "MAILFERRY_ALLOW_PRIVATE_NETWORKS": "1",  # Dovecot listens on 127.0.0.1
        "MAILFERRY_LOG_FORMAT": "console",
    }


# --- the walk-through ---------------------------------------------------------------------------


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    """The steps in the order a newcomer would do them; everything started is put on ``stack``."""
    started = time.monotonic()
    DEMO_DIR.mkdir(exist_ok=True)
    stack.enter_context(single_instance())
    stop_leftovers()

    step("checking PostgreSQL and RabbitMQ")
    database = Database.from_environment()
    if "MAILFERRY_DATABASE_URL" in os.environ:
        note(f"using the server of MAILFERRY_DATABASE_URL (the database is always {DATABASE})")
    ignored = sorted(k for k in os.environ
                     if k.startswith("MAILFERRY_") and k != "MAILFERRY_DATABASE_URL")
    if ignored:
        note(f"ignoring {', '.join(ignored)} from your shell: the demo uses its own settings")
    check_postgres(database)
    check_rabbitmq()

    step(f"creating database {DATABASE} and RabbitMQ vhost {VHOST} (fresh ones on every run)")
    recreate_database(database)
    broker_url = recreate_vhost()
    key, reused = secret_key()
    note(f"database  {_masked(database.url)}")
    note(f"broker    {broker_url.replace(f':{RABBIT_PASSWORD}@', ':***@')}")
    note(f"secret key {'reused from' if reused else 'generated into'} "
         f"{SECRET_KEY_FILE.relative_to(REPO)}")
    demo = Demo(demo_environment(database.url, broker_url, key))

    server = start_dovecot(stack)
    stack.callback(lambda: step("stopping Dovecot"))

    step("setting up mailferry with its CLI")
    demo.cli("db", "upgrade")
    demo.cli("user", "add", "--email", OWNER_EMAIL, "--name", "Demo")
    folders = ",".join(SYNCED)
    add = ["mailbox", "add", "--owner", OWNER_EMAIL, "--host", server.host,
           "--port", str(server.port), "--security", "none", "--username", IMAP_USER,
           "--password-stdin", "--folders", folders]
    print(f"$ echo {IMAP_PASSWORD} | mailferry {shlex.join(add)}", flush=True)
    out = demo.cli(*add, stdin=f"{IMAP_PASSWORD}\n", capture=True, show=False)
    print(out, end="")
    mailbox_id = str(json.loads(out)["id"])
    demo.cli("mailbox", "check", mailbox_id)

    step(f"first sync of mailbox {mailbox_id} (the last 365 days of {folders})")
    # Asked for before the services start: the scheduler's first tick queues every mailbox that
    # never synced, and a `sync --wait` issued after that run finished would queue a second,
    # incremental run and report "0 messages stored". Queued first, the scheduler leaves the
    # mailbox alone and this command reports the run that does the work.
    sync_args = ("sync", "--mailbox", mailbox_id, "--wait", "--timeout", str(SYNC_TIMEOUT))
    print(f"$ mailferry {shlex.join(sync_args)} &", flush=True)
    sync_started = time.monotonic()
    sync = demo.spawn(*sync_args)
    stack.callback(_terminate, sync)
    wait_for_run(database.url, int(mailbox_id), sync)
    note("queued; it runs as soon as a fetcher consumes its command")

    step(f"starting the services: mailferry up --fetchers {FETCHERS} --persisters {PERSISTERS}")
    log = stack.enter_context(open(SERVICES_LOG, "wb"))  # noqa: SIM115 - closed by the stack
    demo.start_services(log)
    stack.callback(demo.stop_services)  # the stack unwinds in reverse: services before Dovecot
    note(f"logs: {SERVICES_LOG.relative_to(REPO)}")
    demo.wait_for_consumers()

    step("waiting for the first sync")
    demo.finish(sync, sync_args, timeout=SYNC_TIMEOUT + 30)
    demo.check_alive()
    note(f"{time.monotonic() - sync_started:.1f}s from the request, service start-up included; "
         f"the run itself: {run_seconds(database.url, int(mailbox_id)):.2f}s")

    step("what was stored")
    demo.cli("mailbox", "folders", mailbox_id)
    print()
    stored = json.loads(demo.cli("messages", "list", "--mailbox", mailbox_id, "--json",
                                 capture=True, show=False))
    table = demo.cli("messages", "list", "--mailbox", mailbox_id, capture=True).splitlines()
    print("\n".join(table[:15]))
    if len(table) > 15:
        print(f"... ({len(table) - 15} more lines)")
    print()
    demo.cli("status")
    complete = verify(stored)

    biggest = max(stored, key=lambda m: m.get("size") or 0) if stored else None
    what_next(mailbox_id, demo.env, str(biggest["id"]) if biggest else "ID",
              f"{server.host}:{server.port}", args.no_wait)
    note(f"(demo ready in {time.monotonic() - started:.0f}s)")

    if not args.no_wait:
        print("\nThe services keep running; press Ctrl-C to stop them and Dovecot.", flush=True)
        while True:
            demo.check_alive()
            time.sleep(1)
    return 0 if complete else 1


def verify(stored: Sequence[dict[str, Any]]) -> bool:
    """Say in one line whether the first sync did its job: the last year of the selected folders,
    nothing older, nothing from unselected folders."""
    counts: dict[str, int] = {}
    for row in stored:
        counts[row["folder"]] = counts.get(row["folder"], 0) + 1
    expected = {folder: recent for folder, (recent, _) in SYNCED.items()}
    old = sum(o for _, o in SYNCED.values())
    if counts == expected:
        note(f"ok: {sum(counts.values())} messages stored; the {old} older than a year were "
             f"skipped and {', '.join(UNSELECTED)} not synced, as designed")
        return True
    note(f"UNEXPECTED: stored per folder {counts}, expected {expected}")
    return False


def what_next(mailbox_id: str, env: dict[str, str], message_id: str, imap_address: str,
              no_wait: bool) -> None:
    """Everything needed to keep exploring from another terminal, ready to paste."""
    exports = "\n".join(f"  export {k}={shlex.quote(env[k])}" for k in (
        "MAILFERRY_DATABASE_URL", "MAILFERRY_BROKER_URL", "MAILFERRY_SECRET_KEY",
        "MAILFERRY_ALLOW_PRIVATE_NETWORKS"))
    queues = ", ".join(w.name for w in WORK_QUEUES)
    example_args = f"{imap_address.replace(':', ' ')} {IMAP_USER} {IMAP_PASSWORD}"
    print(f"""
==> what to try next{' (after `make demo`: with --no-wait everything stops now)' if no_wait else ''}
In another terminal, to use the CLI against the demo:
  cd {shlex.quote(str(REPO))} && source .venv/bin/activate
{exports}

  mailferry messages list --mailbox {mailbox_id} --json | python -m json.tool | head -40
  mailferry messages list --mailbox {mailbox_id} --folder 'Projets/Été'
  mailferry messages raw {message_id} | less        # the exact bytes the server sent
  mailferry messages search --mailbox {mailbox_id} 'subject:facture OR helios'   # accents ignored
  mailferry mailbox check {mailbox_id}                # log in now, print the folder tree
  mailferry mailbox folders {mailbox_id} --enable Archive && mailferry sync --mailbox {mailbox_id} --wait
  mailferry sync --mailbox {mailbox_id} --wait       # again: only new UIDs are fetched
  mailferry mailbox list
  mailferry status

RabbitMQ management UI: {MANAGEMENT_UI} (guest / guest), vhost {VHOST}
  queues: {queues},
  each with its .dead-letter and .retry-<delay> queues; exchanges mailferry.commands and
  mailferry.events.
Logs: services {SERVICES_LOG}  (tail -f)
      Dovecot  {DOVECOT_DIR / 'dovecot.log'}
IMAP: {imap_address}, user {IMAP_USER!r} / password {IMAP_PASSWORD!r}, no TLS: point a mail
      client at it, move or add mail, then `mailferry sync --mailbox {mailbox_id} --wait`;
      or run the README's library example (`Using it as a library`):
      .venv/bin/python example.py {example_args}""")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--no-wait", action="store_true",
                        help="stop everything right after the summary instead of waiting for Ctrl-C")
    args = parser.parse_args(argv)

    def terminate(_signum: int, _frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        with contextlib.ExitStack() as stack:
            try:
                code = run(args, stack)
            finally:
                # A second Ctrl-C must not cut the clean-up short and leave processes behind.
                signal.signal(signal.SIGINT, lambda *_: note("still stopping, please wait..."))
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (KeyboardInterrupt, _Stop):
        code = 0
    except DemoError as exc:
        print(f"\ndemo: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    step("done" if code == 0 else f"done (exit {code})")
    sys.exit(code)


if __name__ == "__main__":
    main()
