"""Credentials that stop working are told to the people who can fix them, once, on three
channels: at next login (stored), in real time (AMQP topic per user) and by email (SMTP)."""

from __future__ import annotations

import email
import email.policy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailferry import db, topology
from mailferry.broker import connect
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot

PASSWORD = "Tr0ub4dor-3"


@dataclass
class Inbox:
    """What the test SMTP server received."""

    messages: list[tuple[list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    def subjects(self) -> list[str]:
        with self.lock:
            return [str(email.message_from_bytes(m, policy=email.policy.default)["subject"])
                    for _, m in self.messages]

    def recipients(self) -> list[str]:
        with self.lock:
            return sorted(r for rcpts, _ in self.messages for r in rcpts)


@pytest.fixture
def smtp_port() -> int:
    return services.free_port()


@pytest.fixture
def smtp(smtp_port: int) -> Iterator[Inbox]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    yield inbox
    controller.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        dovecot.add_user("shared", PASSWORD)
        with dovecot.session("shared") as imap:
            imap.append("INBOX", b"Subject: hi\r\n\r\nhi\r\n")
        yield dovecot


@pytest.fixture
def notifier_env(env: dict[str, str], smtp_port: int) -> dict[str, str]:
    return {**env, "MAILFERRY_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
            "MAILFERRY_SMTP_FROM": "mailferry@example.com", "MAILFERRY_REALTIME": "1"}


def _user(env: dict[str, str], email: str, *capabilities: str) -> int:
    flags = [arg for c in capabilities for arg in ("--capability", c)]
    return int(services.cli(env, "user", "add", "--email", email, *flags)["id"])


def _mailbox(env: dict[str, str], server: Dovecot, owner: str | None) -> int:
    who = ["--owner", owner] if owner else ["--system"]
    return int(services.cli(env, "mailbox", "add", *who, "--host", server.host, "--port",
                    str(server.port), "--security", "none", "--username", "shared",
                    "--password-stdin", stdin=PASSWORD.encode() + b"\n")["id"])


def _sync(env: dict[str, str], mailbox_id: int) -> str:
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "60",
                               "--json"], env)
    return str(json.loads(result.stdout)[0]["status"])


def _pending(env: dict[str, str], email: str) -> list[str]:
    return [n["kind"] for n in services.cli(env, "notifications", "list", "--user", email, "--json")]


def _pending_at_least(env: dict[str, str], email: str, count: int) -> list[str]:
    kinds = _pending(env, email)
    return kinds if len(kinds) >= count else []


class Realtime:
    """A consumer of one user's routing key on the notifications exchange."""

    def __init__(self, broker_url: str, user_id: int) -> None:
        self.conn = connect(broker_url)
        channel = self.conn.default_channel
        topology.NOTIFICATIONS(channel).declare()
        self.queue = channel.queue_declare(queue="", exclusive=True).queue
        channel.queue_bind(self.queue, topology.NOTIFICATIONS.name,
                           topology.user_routing_key(user_id))

    def received(self) -> list[dict[str, Any]]:
        out = []
        while (message := self.conn.default_channel.basic_get(self.queue, no_ack=True)):
            out.append(json.loads(message.body))
        return out


@pytest.fixture
def pipeline(notifier_env: dict[str, str], processes: services.ServiceProcesses
             ) -> services.ServiceProcesses:
    processes.env.update(notifier_env)
    for service in ("fetcher", "persister", "notifier"):
        processes.start(service)
    return processes


def test_the_owner_is_told_once_on_every_channel_and_told_again_when_it_works(
    notifier_env: dict[str, str], server: Dovecot, smtp: Inbox, conn: db.Connection,
    pipeline: services.ServiceProcesses,
) -> None:
    env = notifier_env
    owner = _user(env, "owner@example.com")
    _user(env, "bystander@example.com", "imap_sync_origin_credential_notifications")
    mailbox_id = _mailbox(env, server, "owner@example.com")
    realtime = Realtime(env["MAILFERRY_BROKER_URL"], owner)
    assert _sync(env, mailbox_id) == "done"

    server.set_password("shared", "changed")
    assert _sync(env, mailbox_id) == "failed"
    assert services.eventually(lambda: smtp.recipients()) == ["owner@example.com"]
    assert _pending(env, "owner@example.com") == ["credentials_invalid"]
    assert _pending(env, "bystander@example.com") == []
    pushed = services.eventually(realtime.received)
    assert [p["kind"] for p in pushed] == ["credentials_invalid"]
    _, email = smtp.messages[0]
    text = email.decode()
    assert f"{server.host}:{server.port}" in text and "shared" in text
    assert "mailbox update" in text
    assert PASSWORD not in text and "changed" not in text  # no password, old or new

    assert _sync(env, mailbox_id) == "failed"  # still invalid: nobody is told twice
    server.set_password("shared", PASSWORD)
    assert _sync(env, mailbox_id) == "done"
    services.eventually(lambda: len(smtp.messages) == 2)
    pipeline.assert_running()
    assert smtp.recipients() == ["owner@example.com", "owner@example.com"]
    assert _pending(env, "owner@example.com") == ["credentials_invalid", "credentials_restored"]
    assert [p["kind"] for p in services.eventually(realtime.received)] == ["credentials_restored"]
    popped = services.cli(env, "notifications", "pop", "--user", "owner@example.com", "--json")
    assert [n["kind"] for n in popped] == ["credentials_invalid", "credentials_restored"]
    assert _pending(env, "owner@example.com") == []


def test_a_system_mailbox_tells_every_enabled_user_with_the_capability_and_nobody_else(
    notifier_env: dict[str, str], server: Dovecot, smtp: Inbox, conn: db.Connection,
    pipeline: services.ServiceProcesses,
) -> None:
    env = notifier_env
    _user(env, "admin1@example.com", "imap_sync_origin_credential_notifications")
    _user(env, "admin2@example.com", "imap_sync_origin_credential_notifications", "other")
    _user(env, "plain@example.com")
    disabled = _user(env, "gone@example.com", "imap_sync_origin_credential_notifications")
    conn.execute("UPDATE users SET enabled = false WHERE id = %s", (disabled,))
    mailbox_id = _mailbox(env, server, None)
    server.set_password("shared", "changed")
    assert _sync(env, mailbox_id) == "failed"
    assert services.eventually(lambda: len(smtp.messages) == 2)
    assert smtp.recipients() == ["admin1@example.com", "admin2@example.com"]
    for address, expected in (("admin1@example.com", ["credentials_invalid"]),
                            ("admin2@example.com", ["credentials_invalid"]),
                            ("plain@example.com", []), ("gone@example.com", [])):
        assert _pending(env, address) == expected


def test_the_scheduler_skips_an_invalid_mailbox_until_its_password_is_updated(
    notifier_env: dict[str, str], server: Dovecot, smtp: Inbox, conn: db.Connection,
    pipeline: services.ServiceProcesses,
) -> None:
    env = notifier_env
    _user(env, "owner@example.com")
    mailbox_id = _mailbox(env, server, "owner@example.com")
    server.set_password("shared", "changed")
    assert _sync(env, mailbox_id) == "failed"
    conn.execute("UPDATE sync_runs SET requested_at = now() - interval '1 day'")
    due = conn.execute("SELECT count(*) AS n FROM mailboxes WHERE credentials_invalid_at IS NULL")
    assert due.fetchone() == {"n": 0}

    updated = services.cli(env, "mailbox", "update", str(mailbox_id), "--password-stdin",
                   stdin=b"changed\n")
    assert updated["run_id"] is not None
    run = services.eventually(lambda: conn.execute(
        "SELECT status FROM sync_runs WHERE id = %s AND status = 'done'",
        (updated["run_id"],)).fetchone())
    assert run == {"status": "done"}
    kinds = services.eventually(lambda: _pending_at_least(env, "owner@example.com", 2))
    assert kinds == ["credentials_invalid", "credentials_restored"]


def test_a_reminder_follows_while_the_credentials_stay_invalid(
    notifier_env: dict[str, str], server: Dovecot, smtp: Inbox,
    processes: services.ServiceProcesses,
) -> None:
    processes.env.update({**notifier_env, "MAILFERRY_NOTIFY_REMINDER": "2"})
    for service in ("fetcher", "persister", "notifier"):
        processes.start(service)
    env = notifier_env
    _user(env, "owner@example.com")
    mailbox_id = _mailbox(env, server, "owner@example.com")
    server.set_password("shared", "changed")
    assert _sync(env, mailbox_id) == "failed"
    kinds = services.eventually(lambda: _pending_at_least(env, "owner@example.com", 2))
    assert kinds[:2] == ["credentials_invalid", "credentials_reminder"]
    assert services.eventually(lambda: len(smtp.messages) >= 2)
    assert smtp.subjects()[0] == "Mailbox shared@127.0.0.1 cannot sync, the server refuses its credentials"
    assert smtp.subjects()[1].startswith("Reminder, mailbox shared@127.0.0.1 cannot sync")


def test_a_dead_smtp_server_delays_the_email_without_blocking_the_rest_or_sending_twice(
    notifier_env: dict[str, str], server: Dovecot, smtp_port: int, conn: db.Connection,
    pipeline: services.ServiceProcesses,
) -> None:
    env = notifier_env
    owner = _user(env, "owner@example.com")
    mailbox_id = _mailbox(env, server, "owner@example.com")
    realtime = Realtime(env["MAILFERRY_BROKER_URL"], owner)
    server.set_password("shared", "changed")
    assert _sync(env, mailbox_id) == "failed"
    assert [p["kind"] for p in services.eventually(realtime.received)] == ["credentials_invalid"]
    assert _pending(env, "owner@example.com") == ["credentials_invalid"]
    failing = services.eventually(lambda: conn.execute(
        """SELECT attempts, last_error FROM notification_deliveries
            WHERE channel = 'email' AND status = 'pending' AND attempts > 0""").fetchone())
    assert failing is not None and "Connection refused" in failing["last_error"]

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        assert services.eventually(inbox.recipients, timeout=30) == ["owner@example.com"]
        sent = services.eventually(lambda: conn.execute(
            "SELECT status FROM notification_deliveries WHERE channel = 'email' "
            "AND status = 'sent'").fetchone())
        assert sent == {"status": "sent"}
        services.eventually(lambda: False, timeout=3)  # time for a wrong second send
        assert inbox.recipients() == ["owner@example.com"]
    finally:
        controller.stop()


def test_a_transient_fault_notifies_nobody(
    notifier_env: dict[str, str], smtp: Inbox, conn: db.Connection,
    pipeline: services.ServiceProcesses,
) -> None:
    env = notifier_env
    _user(env, "owner@example.com")
    added = services.cli(env, "mailbox", "add", "--owner", "owner@example.com", "--host", "127.0.0.1",
                 "--port", str(services.free_port()), "--security", "none", "--username", "x",
                 "--password-stdin", stdin=b"pw\n")
    assert _sync(env, int(added["id"])) == "failed"
    run = conn.execute("SELECT error_kind, attempts FROM sync_runs").fetchone()
    # every try failed and is counted: the first and one per retry delay, with back-off
    assert run == {"error_kind": "connection", "attempts": 4}
    assert conn.execute("SELECT count(*) AS n FROM notifications").fetchone() == {"n": 0}
    assert smtp.messages == []
