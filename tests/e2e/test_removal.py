"""Removing a mailbox while the real services sync it, and a removal killed half-way: nothing of
the mailbox is left, and another mailbox holding the very same mail keeps all of it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.devkit import faults, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.tcp_proxy import TcpProxy

FOLDERS = ("INBOX",)
ENV = {"MAILFERRY_LEASE_SECONDS": "4", "MAILFERRY_BATCH_MAX_MESSAGES": "100",
       "MAILFERRY_RETRY_DELAYS": "1,1,2,2,3"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    """alice holds 2,000 messages; bob the first 300 of them, byte for byte (same seed)."""
    with Dovecot(tmp_path / "dovecot") as dovecot:
        for user, count in (("alice", 2000), ("bob", 300)):
            dovecot.add_user(user, "secret")
            faults.fill(dovecot, user, "INBOX", range(count), random.Random(7))
        yield dovecot


def _leftovers(database_url: str, mailbox_id: int) -> dict[str, int]:
    [row] = faults.sql(database_url, """
        SELECT (SELECT count(*) FROM mailboxes WHERE id = %(m)s) AS mailboxes,
               (SELECT count(*) FROM folders WHERE mailbox_id = %(m)s) AS folders,
               (SELECT count(*) FROM messages WHERE mailbox_id = %(m)s) AS messages,
               (SELECT count(*) FROM notifications WHERE mailbox_id = %(m)s) AS notifications,
               (SELECT count(*) FROM sync_runs WHERE mailbox_id = %(m)s) AS runs,
               (SELECT count(*) FROM message_folders mf
                 WHERE NOT EXISTS (SELECT 1 FROM folders f WHERE f.id = mf.folder_id))
                   AS orphan_placements,
               (SELECT count(*) FROM raw_messages r
                 WHERE NOT EXISTS (SELECT 1 FROM messages g WHERE g.sha256 = r.sha256))
                   AS unreferenced_raw""", {"m": mailbox_id})
    return dict(row)


NOTHING = {"mailboxes": 0, "folders": 0, "messages": 0, "notifications": 0, "runs": 0,
           "orphan_placements": 0, "unreferenced_raw": 0}


def _add(env: dict[str, str], server: Dovecot, user: str) -> int:
    return faults.add_mailbox(env, server.host, server.port, user, "secret", FOLDERS,
                              owner=f"{user}@example.com")


def _pipeline(env: dict[str, str], processes: services.ServiceProcesses) -> dict[str, str]:
    """The scheduler, a fetcher and a persister running with this file's settings."""
    processes.env.update(ENV)
    for service in ("scheduler", "fetcher", "persister"):
        processes.start(service)
    return {**env, **ENV}


def _synced(database_url: str, mailbox_id: int) -> bool:
    return bool(faults.sql(database_url, "SELECT 1 FROM sync_runs WHERE mailbox_id = %s "
                           "AND status = 'done' AND kind = 'mailbox'", (mailbox_id,)))


def test_removing_a_mailbox_during_its_sync_leaves_nothing_and_spares_identical_mail(
    env: dict[str, str], database_url: str, server: Dovecot,
    processes: services.ServiceProcesses,
) -> None:
    env = _pipeline(env, processes)
    bob = _add(env, server, "bob")
    assert services.eventually(lambda: _synced(database_url, bob), timeout=120), processes.logs()
    with TcpProxy(server.host, server.port) as proxy:
        # alice's fetcher is held in the middle of her INBOX until the removal is done
        proxy.pause_after(1_500_000)
        alice = faults.add_mailbox(env, server.host, proxy.port, "alice", "secret", FOLDERS,
                                   owner="alice@example.com")
        assert proxy.paused.wait(120), "the fetcher never got 1.5 MB"
        stored = services.eventually(lambda: faults.sql(
            database_url, "SELECT count(*) AS n FROM messages WHERE mailbox_id = %s HAVING "
            "count(*) >= 100", (alice,)), timeout=120, interval=0.05)
        assert stored, processes.logs()
        shared = faults.sql(  # bytes alice's stored mail shares with bob's: they must survive
            database_url, "SELECT count(*) AS n FROM messages a JOIN messages b USING (sha256) "
            "WHERE a.mailbox_id = %s AND b.mailbox_id = %s", (alice, bob))[0]["n"]
        assert not _synced(database_url, alice), "the sync ended before the removal"

        result = services.run_cli(["mailbox", "remove", str(alice), "--yes"], env)
        assert result.returncode == 0, result.stderr
        removed = json.loads(result.stdout)
        assert removed["mailbox_id"] == alice and removed["messages"] >= 100
        if shared:  # the bytes alice shared with bob were not removed with her messages
            assert removed["raw_messages"] < removed["messages"], (shared, removed)
        assert _leftovers(database_url, alice) == NOTHING
        proxy.resume()  # the held attempt goes on, on a mailbox that is gone

        time.sleep(8)  # its events are refused, nothing comes back
    processes.assert_running()
    assert _leftovers(database_url, alice) == NOTHING
    assert faults.assert_store_equals_server(server, "bob", database_url, bob, FOLDERS) == 300
    # The attempt was cut by the removal: its events still in flight were refused by the
    # persister, or (when the persister had drained them all) the fetcher saw the mailbox go.
    refused = [line for line in faults.log_lines(processes.log_dir, "persister")
               if line.get("event") in ("event.fenced", "event.dropped")]
    stopped = [line for line in faults.log_lines(processes.log_dir, "fetcher")
               if line.get("mailbox_id") == alice and (
                   "lease" in str(line.get("error", "")).lower()
                   or line.get("reason") == "mailbox no longer exists")]
    assert refused or stopped, "the removal cut no attempt: the sync was not in flight"


def test_a_removal_killed_half_way_completes_when_run_again(
    env: dict[str, str], database_url: str, server: Dovecot,
    processes: services.ServiceProcesses,
) -> None:
    env = _pipeline(env, processes)
    bob, alice = _add(env, server, "bob"), _add(env, server, "alice")
    assert services.eventually(lambda: _synced(database_url, alice) and _synced(database_url, bob),
                               timeout=180), processes.logs()
    processes.stop()

    remover = subprocess.Popen(
        [sys.executable, "-m", "mailferry.services.cli.main", "mailbox", "remove", str(alice), "--yes",
         "--batch", "10"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=services.REPO)
    middle = services.eventually(lambda: faults.sql(
        database_url, "SELECT count(*) AS n FROM messages WHERE mailbox_id = %s "
        "HAVING count(*) BETWEEN 1 AND 1900", (alice,)), timeout=60, interval=0.01)
    faults.kill9(remover)
    assert middle, "the removal was never seen half-way"
    [half] = faults.sql(database_url, "SELECT removing_at IS NOT NULL AS removing, "
                        "sync_enabled FROM mailboxes WHERE id = %s", (alice,))
    assert half == {"removing": True, "sync_enabled": False}
    assert _leftovers(database_url, alice)["unreferenced_raw"] == 0  # chunks are whole

    again = services.run_cli(["mailbox", "remove", str(alice), "--yes"], env)
    assert again.returncode == 0, again.stderr
    assert _leftovers(database_url, alice) == NOTHING
    assert faults.assert_store_equals_server(server, "bob", database_url, bob, FOLDERS) == 300
    repeated = services.run_cli(["mailbox", "remove", str(alice), "--yes"], env)
    assert repeated.returncode == 2 and b"no mailbox with id" in repeated.stderr
