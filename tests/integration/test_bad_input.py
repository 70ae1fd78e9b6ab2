"""Bad connection settings give one clear line and a non-zero exit, and a recorded failure from a
sync with nothing half-written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        dovecot.add_user("alice", "secret")
        with dovecot.session("alice") as imap:
            imap.append("INBOX", b"Subject: hello\r\n\r\nhi\r\n")
        yield dovecot


def _add_mailbox(env: dict[str, str], host: str, port: int, password: str) -> int:
    assert services.run_cli(["user", "add", "--email", "alice@example.com"], env).returncode == 0
    added = services.run_cli(
        ["mailbox", "add", "--owner", "alice@example.com", "--host", host, "--port", str(port),
         "--security", "none", "--username", "alice", "--password-stdin"],
        env, stdin=password.encode() + b"\n",
    )
    assert added.returncode == 0, added.stderr
    return int(json.loads(added.stdout)["id"])


def _one_error_line(result: object) -> str:
    stderr = result.stderr.decode()  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mailferry: error: ")
    return lines[0]


def test_check_with_a_wrong_password_says_the_login_was_refused(
    env: dict[str, str], server: Dovecot
) -> None:
    mailbox_id = _add_mailbox(env, server.host, server.port, "wrong")
    result = services.run_cli(["mailbox", "check", str(mailbox_id)], env)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert "login refused for user 'alice'" in line
    assert "wrong" not in line.replace("wrong port", "")  # the password is never printed


def test_check_of_a_closed_port_says_the_connection_was_refused(env: dict[str, str]) -> None:
    port = services.free_port()
    mailbox_id = _add_mailbox(env, "127.0.0.1", port, "secret")
    result = services.run_cli(["mailbox", "check", str(mailbox_id)], env)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}: connection refused" in _one_error_line(result)


def test_check_of_an_unknown_host_says_the_name_does_not_resolve(env: dict[str, str]) -> None:
    mailbox_id = _add_mailbox(env, "no-such-host.invalid", 993, "secret")
    result = services.run_cli(["mailbox", "check", str(mailbox_id), "--json"], env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["error_kind"] == "connection"
    assert "cannot be resolved" in report["error"]


def test_check_with_the_right_settings_prints_the_folder_tree(
    env: dict[str, str], server: Dovecot
) -> None:
    with server.session("alice") as imap:
        imap.create_folder("Projets/Été")
    mailbox_id = _add_mailbox(env, server.host, server.port, "secret")
    result = services.run_cli(["mailbox", "check", str(mailbox_id)], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.startswith("ok: logged in to")
    assert "  INBOX  (inbox)" in out
    assert "    Été" in out


def test_a_sync_with_a_wrong_password_is_recorded_as_failed_and_writes_nothing(
    env: dict[str, str], server: Dovecot, conn: db.Connection,
    processes: services.ServiceProcesses,
) -> None:
    mailbox_id = _add_mailbox(env, server.host, server.port, "wrong")
    processes.start("fetcher")
    processes.start("persister")
    processes.start("notifier")
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "60",
                               "--json"], env)
    assert result.returncode == 1, result.stderr.decode() + processes.logs()
    [run] = json.loads(result.stdout)
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
    mailbox_id = _add_mailbox(env, "127.0.0.1", services.free_port(), "secret")
    processes.start("fetcher")
    processes.start("persister")
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "60",
                               "--json"], env)
    assert result.returncode == 1, result.stderr.decode() + processes.logs()
    [run] = json.loads(result.stdout)
    assert (run["status"], run["error_kind"]) == ("failed", "connection")
    assert "connection refused" in run["error"]
    mailbox = conn.execute("SELECT credentials_invalid_at FROM mailboxes").fetchone()
    assert mailbox == {"credentials_invalid_at": None}
    assert conn.execute("SELECT count(*) AS n FROM message_folders").fetchone() == {"n": 0}
