"""Bad connection settings give one clear line and a non-zero exit (the recorded failure of a sync
with them: tests/e2e/test_bad_sync.py)."""

from __future__ import annotations

import json

from mailferry import db, slots
from mailferry.config import Settings
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from tests.bad_settings import add_alice_mailbox


def _one_error_line(result: object) -> str:
    stderr = result.stderr.decode()  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mailferry: error: ")
    return lines[0]


def test_check_with_a_wrong_password_says_the_login_was_refused(
    env: dict[str, str], alice_server: Dovecot
) -> None:
    mailbox_id = add_alice_mailbox(env, alice_server.host, alice_server.port, "wrong")
    result = services.run_cli(["mailbox", "check", str(mailbox_id)], env)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert "login refused for user 'alice'" in line
    assert "wrong" not in line.replace("wrong port", "")  # the password is never printed


def test_check_of_a_closed_port_says_the_connection_was_refused(env: dict[str, str]) -> None:
    port = services.free_port()
    mailbox_id = add_alice_mailbox(env, "127.0.0.1", port, "secret")
    result = services.run_cli(["mailbox", "check", str(mailbox_id)], env)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}: connection refused" in _one_error_line(result)


def test_check_of_an_unknown_host_says_the_name_does_not_resolve(env: dict[str, str]) -> None:
    mailbox_id = add_alice_mailbox(env, "no-such-host.invalid", 993, "secret")
    result = services.run_cli(["mailbox", "check", str(mailbox_id), "--json"], env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["error_kind"] == "connection"
    assert "cannot be resolved" in report["error"]


def test_check_with_the_right_settings_prints_the_folder_tree(
    env: dict[str, str], alice_server: Dovecot
) -> None:
    with alice_server.session("alice") as imap:
        imap.create_folder("Projets/Été")
    mailbox_id = add_alice_mailbox(env, alice_server.host, alice_server.port, "secret")
    result = services.run_cli(["mailbox", "check", str(mailbox_id)], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert out.startswith("ok: logged in to")
    assert "  INBOX  (inbox)" in out
    assert "    Été" in out


def test_check_counts_in_the_accounts_connection_budget_and_says_when_it_is_full(
    env: dict[str, str], alice_server: Dovecot, conn: db.Connection, settings: Settings
) -> None:
    mailbox_id = add_alice_mailbox(env, alice_server.host, alice_server.port, "secret")
    one = {**env, "MAILFERRY_MAX_CONNECTIONS_PER_ACCOUNT": "1"}
    taken = slots.claim(conn, settings.model_copy(update={"max_connections_per_account": 1}),
                        holder="a sync", mailbox_id=mailbox_id, host=alice_server.host,
                        username="alice", purpose=slots.Purpose.SYNC, seconds=60)
    assert taken is not None
    result = services.run_cli(["mailbox", "check", str(mailbox_id), "--json"], one)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["ok"], report["error_kind"]) == (False, "throttled")
    assert "no connection slot free for 'alice'" in report["error"]
    slots.release(conn, taken)
    assert services.run_cli(["mailbox", "check", str(mailbox_id)], one).returncode == 0
    left = conn.execute("SELECT count(*) AS n FROM imap_connection_slots").fetchone()
    assert left == {"n": 0}, "the check released its slot"
