"""The change stream under crashes (DESIGN invariant 10): persisters, and with them the relay
they host, are killed with SIGKILL at random moments of a first sync; a consumer's queue on
``mailferry.changes`` still receives every change at least once, with the same id on every
delivery, every first-sync message flagged ``backfill``, and new mail afterwards not.

The random moments come from ``MAILFERRY_FAULT_SEED`` (random when unset; printed).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from kombu.connection import Connection
from kombu.entity import Queue

from mailferry import topology
from mailferry.devkit import faults, services
from mailferry.devkit.dovecot import Dovecot

USER, PASSWORD = "alice", "secret"
SEED = int(os.environ.get("MAILFERRY_FAULT_SEED") or random.randrange(1 << 30))
MESSAGES = 400
CRASH_ENV = {  # small batches, so that a kill lands between many events; quick takeovers
    "MAILFERRY_BATCH_MAX_MESSAGES": "10",
    "MAILFERRY_LEASE_SECONDS": "4",
    "MAILFERRY_RETRY_DELAYS": "1,1,2,2,3,3,5,5,8",
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        dovecot.add_user(USER, PASSWORD)
        yield dovecot


@pytest.fixture
def cenv(env: dict[str, str]) -> dict[str, str]:
    return {**env, **CRASH_ENV}


@pytest.fixture
def procs(cenv: dict[str, str], tmp_path: Path) -> Iterator[services.ServiceProcesses]:
    processes = services.ServiceProcesses(cenv, tmp_path)
    yield processes
    processes.stop()


def _received(url: str, queue: Queue) -> list[dict[str, Any]]:
    """Everything waiting in the consumer's queue, in delivery order."""
    out = []
    with Connection(url) as conn:
        bound = queue(conn.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            out.append(json.loads(message.body))
    return out


def _tailing(vhost: str) -> bool:
    """`mailferry changes tail` has bound its queue."""
    queues = services.rabbit_api("GET", f"/queues/{quote(vhost, safe='')}")
    assert isinstance(queues, list)
    return any(q["name"].startswith("mailferry.cli.changes-tail") for q in queues)


def _drained(database_url: str) -> bool:
    return not faults.sql(database_url,
                          "SELECT 1 FROM change_outbox WHERE published_at IS NULL LIMIT 1")


@pytest.mark.timeout(400)
def test_killed_persisters_and_relays_lose_no_change_and_replays_keep_their_ids(
    server: Dovecot, cenv: dict[str, str], database_url: str, vhost: tuple[str, str],
    procs: services.ServiceProcesses,
) -> None:
    rng = random.Random(SEED)
    print(f"MAILFERRY_FAULT_SEED={SEED}")
    faults.fill(server, USER, "INBOX", range(MESSAGES), rng)
    mailbox_id = faults.add_mailbox(cenv, server.host, server.port, USER, PASSWORD, ["INBOX"])
    url = cenv["MAILFERRY_BROKER_URL"]
    queue = Queue("test.consumer", exchange=topology.CHANGES, durable=True,
                  routing_key=topology.changes_binding(mailbox_id))
    with Connection(url) as conn:
        topology.CHANGES(conn.default_channel).declare()
        queue(conn.default_channel).declare()
    procs.start("fetcher")
    procs.start("persister", 2)

    run_id = faults.request_sync(cenv, mailbox_id)
    # three moments; the second kill takes every persister, so the relay dies for sure
    targets = sorted(rng.uniform(0.1, 0.85) * MESSAGES for _ in range(3))
    for kill, target in enumerate(targets):
        services.eventually(lambda t=target: int(faults.run_row(database_url, run_id)[
            "messages_stored"]) >= t or faults.run_row(database_url, run_id)["status"] != "running",
            timeout=120)
        victims = faults.alive(procs, "persister")
        for victim in victims if kill == 1 else [rng.choice(victims)]:
            faults.kill9(victim)
            procs.start("persister")
        print(f"kill {kill}: {len(victims) if kill == 1 else 1} persister(s) at "
              f"{faults.run_row(database_url, run_id)['messages_stored']}/{MESSAGES} stored, "
              f"{len(faults.sql(database_url, 'SELECT 1 FROM change_outbox'))} changes written")
    assert faults.wait_for_run(database_url, run_id, procs)["status"] == "done"
    assert services.eventually(lambda: _drained(database_url), timeout=60)
    first = _received(url, queue)

    # then one new message, watched live by `mailferry changes tail`
    tail = subprocess.Popen(
        [sys.executable, "-m", "mailferry.services.cli.main", "changes", "tail", "--json",
         "--mailbox", str(mailbox_id)], env={**os.environ, **cenv}, stdout=subprocess.PIPE,
        text=True, cwd=services.REPO)
    tailed: list[str] = []
    threading.Thread(target=lambda: tailed.extend(tail.stdout or ()), daemon=True).start()
    try:
        assert services.eventually(lambda: _tailing(vhost[0]), timeout=60)
        server.append(USER, None, "INBOX", b"From: bob@example.com\r\nSubject: New\r\n\r\nhi\r\n")
        second = faults.request_sync(cenv, mailbox_id)
        assert faults.wait_for_run(database_url, second, procs)["status"] == "done"
        # (the first sync's MessageParsed events may come first: its mail is parsed after it)
        assert services.eventually(lambda: _stored_lines(tailed), timeout=30)
    finally:
        tail.terminate()
        tail.wait(timeout=10)
    assert services.eventually(lambda: _drained(database_url), timeout=60)
    later = _received(url, queue)

    stored = faults.sql(database_url, """
        SELECT mf.uid FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
         WHERE f.mailbox_id = %s AND mf.expunged_at IS NULL""", (mailbox_id,))
    outbox = faults.sql(database_url, "SELECT event_id, seq FROM change_outbox "
                                      "WHERE mailbox_id = %s ORDER BY seq", (mailbox_id,))
    by_uid: dict[int, set[tuple[str, int]]] = defaultdict(set)
    for change in first + later:
        if change["type"] == "MessageStored":
            by_uid[change["uid"]].add((change["id"], change["seq"]))
    # every stored message announced, each under one id and number however often it came
    assert sorted(by_uid) == sorted(r["uid"] for r in stored)
    assert all(len(ids) == 1 for ids in by_uid.values()), {u: i for u, i in by_uid.items()
                                                            if len(i) > 1}
    # every change written (gap-free numbers) reached the consumer
    assert [r["seq"] for r in outbox] == list(range(1, len(outbox) + 1))
    assert {c["id"] for c in first + later} == {str(r["event_id"]) for r in outbox}
    # old mail is never announced as new; the new message is
    assert all(c["backfill"] for c in first if c["type"] == "MessageStored")
    new = [c for c in later if c["type"] == "MessageStored"]
    assert [(c["subject"], c["backfill"]) for c in new] == [("New", False)]
    assert [change["id"] for change in _stored_lines(tailed)] == [new[0]["id"]]
    # a consumer that was away catches up from PostgreSQL
    listed = services.cli(cenv, "changes", "list", "--since", str(len(outbox) - 1),
                          "--mailbox", str(mailbox_id), "--json")
    assert [c["id"] for c in listed] == [str(outbox[-1]["event_id"])]


def _stored_lines(lines: list[str]) -> list[dict[str, Any]]:
    """The MessageStored changes among `changes tail --json` lines."""
    return [c for c in map(json.loads, list(lines)) if c["type"] == "MessageStored"]
