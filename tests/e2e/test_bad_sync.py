"""A sync with bad connection settings is a recorded failure, with nothing half-written."""

from __future__ import annotations

import json
from typing import Any

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from tests.bad_settings import add_alice_mailbox


def test_a_sync_with_a_wrong_password_is_recorded_as_failed_and_writes_nothing(
    env: dict[str, str], alice_server: Dovecot, conn: db.Connection,
    processes: services.ServiceProcesses,
) -> None:
    mailbox_id = add_alice_mailbox(env, alice_server.host, alice_server.port, "wrong")
    processes.start("fetcher")
    processes.start("persister")
    processes.start("notifier")
    run = _failed_sync(env, mailbox_id, processes)
    assert run["status"] == "failed"
    assert run["error_kind"] == "auth"
    mailbox = conn.execute("SELECT * FROM mailboxes WHERE id = %s", (mailbox_id,)).fetchone()
    assert mailbox is not None
    assert mailbox["credentials_invalid_at"] is not None
    assert mailbox["last_error_kind"] == "auth"
    assert conn.execute("SELECT count(*) AS n FROM folders").fetchone() == {"n": 0}
    assert conn.execute("SELECT count(*) AS n FROM messages").fetchone() == {"n": 0}
    notified = services.eventually(lambda: conn.execute(
        """SELECT u.email, n.kind FROM notifications n JOIN users u ON u.id = n.user_id"""
    ).fetchall())
    assert notified == [{"email": "alice@example.com", "kind": "credentials_invalid"}]


def test_a_sync_of_a_closed_port_is_recorded_as_a_connection_failure(
    env: dict[str, str], conn: db.Connection, processes: services.ServiceProcesses,
) -> None:
    mailbox_id = add_alice_mailbox(env, "127.0.0.1", services.free_port(), "secret")
    processes.start("fetcher")
    processes.start("persister")
    run = _failed_sync(env, mailbox_id, processes)
    assert (run["status"], run["error_kind"]) == ("failed", "connection")
    assert "connection refused" in run["error"]
    mailbox = conn.execute("SELECT credentials_invalid_at FROM mailboxes").fetchone()
    assert mailbox == {"credentials_invalid_at": None}
    assert conn.execute("SELECT count(*) AS n FROM message_folders").fetchone() == {"n": 0}


def _failed_sync(env: dict[str, str], mailbox_id: int,
                 processes: services.ServiceProcesses) -> dict[str, Any]:
    """``sync --wait`` of a mailbox that cannot sync: exit code 1 and its run."""
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "60",
                               "--json"], env)
    assert result.returncode == 1, result.stderr.decode() + processes.logs()
    [run] = json.loads(result.stdout)
    return dict(run)
