"""What a re-sync of an unchanged mailbox costs on the wire (DESIGN invariant 6).

The fetcher reaches Dovecot through a counting :class:`TcpProxy`, so these tests see every IMAP
command it sends. They assert on command names and fetch items, never on whole lines: how the
client logs in (LOGIN or AUTHENTICATE), whether it uses ESEARCH or UID windows is its own
business; what it must not do is read an unchanged folder again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from mailferry.devkit import faults, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.tcp_proxy import Command, TcpProxy, Traffic

USER, PASSWORD = "carol", "round trips"
EMPTY = "Empty"  # enabled, never holds mail: its UIDNEXT never moves
FOLDERS = ("INBOX", "Work", EMPTY)
# The commands an unchanged CONDSTORE folder may cost: the session, the folder list, one
# EXAMINE/SELECT or STATUS per folder. Anything that reads messages or searches them is out.
SESSION_VERBS = frozenset({
    "CAPABILITY", "LOGIN", "AUTHENTICATE", "STARTTLS", "ID", "ENABLE", "COMPRESS", "NAMESPACE",
    "LIST", "LSUB", "STATUS", "EXAMINE", "SELECT", "UNSELECT", "CLOSE", "NOOP", "CHECK",
    "LOGOUT",
})
READS = frozenset({"FETCH", "UID FETCH", "SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD",
                   "UID THREAD"})
BODY_ITEMS = ("BODY[", "BODY.PEEK[", "BINARY[", "BINARY.PEEK[", "RFC822")  # RFC 3501 6.4.5


@contextmanager
def _server(base: Path, hidden: Sequence[str] = ()) -> Iterator[Dovecot]:
    """Dovecot with 180 messages in two folders and an empty third; ``hidden`` capabilities
    not announced."""
    with Dovecot(base, capabilities_hidden=hidden) as server:
        server.add_user(USER, PASSWORD)
        server.create_folder(USER, EMPTY)
        rng = random.Random(6)
        faults.fill(server, USER, "INBOX", range(120), rng)
        faults.fill(server, USER, "Work", range(120, 180), rng, flags=["\\Seen"])
        yield server


def _sync(env: dict[str, str], mailbox_id: int) -> dict[str, object]:
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "120",
                               "--json"], env, timeout=180)
    assert result.returncode == 0, result.stderr.decode()
    runs = json.loads(result.stdout)
    assert len(runs) == 1, runs
    run: dict[str, object] = runs[0]
    return run


def _applied(processes: services.ServiceProcesses, run_id: object) -> list[str]:
    """The types of the events the persisters applied for one run, from their logs."""
    lines = [json.loads(line) for path in sorted(processes.log_dir.glob("persister-*.log"))
             for line in path.read_text(errors="replace").splitlines() if line.startswith("{")]
    return [line["type"] for line in lines
            if line.get("event") == "event.applied" and line.get("run_id") == str(run_id)]


def _first_and_second_sync(server: Dovecot, env: dict[str, str],
                           processes: services.ServiceProcesses) -> tuple[Traffic, Traffic, object]:
    """The traffic of a first sync and of a second one with nothing changed in between, and
    the second run's id."""
    with TcpProxy(server.host, server.port) as proxy:
        mailbox_id = faults.add_mailbox(env, proxy.host, proxy.port, USER, PASSWORD, FOLDERS)
        processes.start("fetcher")
        processes.start("persister")
        first_run = _sync(env, mailbox_id)
        first = proxy.take()
        second_run = _sync(env, mailbox_id)
        second = proxy.take()
    processes.assert_running()
    assert first_run["status"] == "done", f"{first_run}\n{processes.logs()}"
    assert first_run["messages_stored"] == 180, first_run
    assert second_run["status"] == "done", f"{second_run}\n{processes.logs()}"
    assert second_run["messages_stored"] == 0, second_run
    assert "SyncCompleted" not in _applied(processes, first_run["run_id"])
    return first, second, second_run["run_id"]


def _while_open(folder: str, commands: list[Command]) -> list[Command]:
    """The commands sent while ``folder`` was the one selected (up to the next selection)."""
    out, inside = [], False
    for command in commands:
        if command.verb in ("EXAMINE", "SELECT", "UNSELECT", "CLOSE", "LOGOUT"):
            inside = command.verb in ("EXAMINE", "SELECT") and folder in command.text
        elif inside:
            out.append(command)
    return out


def _assert_no_needless_round_trip(first: Traffic, second: Traffic) -> None:
    """Issue 11: no CAPABILITY after a greeting that carried the capabilities (Dovecot's does),
    and no SEARCH in a folder that is empty, on the first sync or any later one."""
    assert "CAPABILITY" not in first.verbs + second.verbs, first.verbs
    for traffic in (first, second):
        assert EMPTY in " ".join(c.text for c in traffic.commands), traffic.verbs
        searches = [c.text for c in _while_open(EMPTY, traffic.commands) if "SEARCH" in c.verb]
        assert not searches, f"the empty folder was searched: {searches}"


def _fetches(commands: list[Command]) -> list[str]:
    return [c.text.upper() for c in commands if c.verb in ("FETCH", "UID FETCH")]


def _opened_every_folder(commands: list[Command]) -> bool:
    """Each enabled folder was looked at (EXAMINE/SELECT or STATUS): the sync did its work."""
    looked_at = " ".join(c.text for c in commands if c.verb in ("EXAMINE", "SELECT", "STATUS"))
    return all(folder in looked_at for folder in FOLDERS)


@pytest.mark.timeout(300)
def test_a_resync_of_an_unchanged_condstore_mailbox_sends_no_fetch_and_no_search(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
) -> None:
    with _server(tmp_path / "dovecot") as server:
        first, second, second_run = _first_and_second_sync(server, env, processes)

    assert any("BODY.PEEK[" in text for text in _fetches(first.commands)), first.verbs
    assert second.verbs, "the second sync sent nothing: did it reach the proxy?"
    assert _opened_every_folder(second.commands), second.verbs
    reads = [c.text for c in second.commands if c.verb in READS]
    assert not reads, f"an unchanged CONDSTORE folder was read: {reads}"
    assert set(second.verbs) <= SESSION_VERBS, second.verbs
    _assert_no_needless_round_trip(first, second)
    # Nothing to store: the whole run reached the persister as one event (one transaction).
    assert _applied(processes, second_run) == ["SyncCompleted"]
    # A few round trips per session and folder, whatever the folders hold (180 messages here).
    assert len(second.commands) <= 8 + 2 * len(FOLDERS), second.verbs


@pytest.mark.timeout(300)
def test_a_resync_without_condstore_fetches_flags_but_no_message_body(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
) -> None:
    with _server(tmp_path / "dovecot", hidden=("CONDSTORE", "QRESYNC")) as server:
        first, second, _ = _first_and_second_sync(server, env, processes)

    assert any("BODY.PEEK[" in text for text in _fetches(first.commands)), first.verbs
    assert _opened_every_folder(second.commands), second.verbs
    fetches = _fetches(second.commands)
    bodies = [text for text in fetches if any(item in text for item in BODY_ITEMS)]
    assert not bodies, f"an unchanged folder's messages were downloaded again: {bodies}"
    # Without CONDSTORE only a flags pass can find re-flagged messages (invariant 7).
    assert any("FLAGS" in text for text in fetches), second.verbs
    _assert_no_needless_round_trip(first, second)
