"""One fetcher process syncs several mailboxes at once, and a sync longer than RabbitMQ's
consumer_timeout completes in slices, on real Dovecot, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import amqp
import pytest
from pydantic import SecretStr

from mailferry import app, db
from mailferry.broker import Publisher
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.rabbitmq import private_node
from mailferry.devkit.tcp_proxy import TcpProxy
from mailferry.messages import SyncMailbox


def _fill(server: Dovecot, user: str, count: int, size: int = 200) -> dict[int, str]:
    """``count`` messages in the user's INBOX; returns UID -> SHA-256 of the bytes stored."""
    server.add_user(user, "secret")
    with server.session(user) as imap:
        for i in range(count):
            imap.append("INBOX", (f"Subject: {user} {i}\r\nMessage-ID: <{user}.{i}@example.com>"
                                  f"\r\n\r\n{'x' * size}\r\n").encode())
        imap.select_folder("INBOX", readonly=True)
        fetched = imap.fetch(imap.search(["ALL"]), ["BODY.PEEK[]"])
    return {uid: hashlib.sha256(data[b"BODY[]"]).hexdigest() for uid, data in fetched.items()}


def _add_mailboxes(env: dict[str, str], proxy: TcpProxy, users: Iterable[str]) -> dict[str, int]:
    """Registered through the service layer, as ``mailbox add`` does (no CLI start-up each)."""
    box = PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"]))
    with db.connect(env["MAILFERRY_DATABASE_URL"], autocommit=True) as conn:
        app.add_user(conn, "owner@example.com")
        return {user: app.add_mailbox(conn, box, owner_email="owner@example.com",
                                      host=proxy.host, port=proxy.port, security="none",
                                      username=user, password="secret", folders=["INBOX"])
                for user in users}


def _stored(env: dict[str, str], mailbox_id: int) -> dict[int, str]:
    listed = services.cli(env, "messages", "list", "--mailbox", str(mailbox_id), "--json")
    return {m["uid"]: m["sha256"] for m in listed}


def test_one_fetcher_process_syncs_several_mailboxes_at_once_each_under_its_own_lease(
    env: dict[str, str], conn: db.Connection, tmp_path: Path,
) -> None:
    users = ("ann", "bob", "cid", "dan")
    env = {**env, "MAILFERRY_FETCHER_CONCURRENCY": "4"}
    processes = services.ServiceProcesses(env, tmp_path)
    # 100 ms each way: a sync is a few seconds of waiting on the server.
    with Dovecot(tmp_path / "dovecot") as server, \
            TcpProxy(server.host, server.port, latency=0.1) as proxy:
        expected = {user: _fill(server, user, 5) for user in users}
        ids = _add_mailboxes(env, proxy, users)
        try:
            processes.start("fetcher")
            processes.start("persister")
            services.cli(env, "sync", "--all", "--wait", "--timeout", "120", "--json")
            runs = conn.execute("SELECT mailbox_id, status, started_at, finished_at "
                                "FROM sync_runs").fetchall()
            tokens = {r["id"]: (r["lease_token"], r["lease_owner"]) for r in conn.execute(
                "SELECT id, lease_token, lease_owner FROM mailboxes").fetchall()}
            stored = {user: _stored(env, ids[user]) for user in users}

            # The same command twice at once: the second delivery finds the lease taken and
            # waits for a retry, however many threads the process has free.
            run_id = uuid.uuid4()
            command = SyncMailbox(run_id=run_id, mailbox_id=ids["ann"], requested_by="test")
            publisher = Publisher(env["MAILFERRY_BROKER_URL"], (1.0,))
            try:
                publisher.publish(command)
                publisher.publish(command)
            finally:
                publisher.close()
            assert services.eventually(lambda: conn.execute(
                "SELECT 1 FROM sync_runs WHERE id = %s AND status = 'done'", (run_id,)
            ).fetchone(), timeout=60), processes.logs()
            processes.assert_running()
            logs = processes.logs()
        finally:
            processes.stop()

    assert len(runs) == len(users)
    assert {r["status"] for r in runs} == {"done"}
    # Every run started before any finished: the four syncs were under way together, in one
    # process (one fetcher was started).
    assert max(r["started_at"] for r in runs) < min(r["finished_at"] for r in runs)
    assert set(tokens.values()) == {(1, None)}  # one lease taken per mailbox, all released
    assert stored == expected
    token = conn.execute("SELECT lease_token FROM mailboxes WHERE id = %s",
                         (ids["ann"],)).fetchone()["lease_token"]
    assert token == 2  # the duplicate never took the lease: it waited, then found the run done
    assert "LeaseHeld" in logs


def _consumer_timeout_is_enforced(url: str) -> bool:
    """A delivery held unacknowledged past the node's consumer_timeout closes its channel."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with amqp.Connection(host=f"127.0.0.1:{port}") as conn:
        channel = conn.channel()
        channel.queue_declare("probe", auto_delete=True)
        channel.basic_publish(amqp.Message("held"), routing_key="probe")
        channel.basic_consume("probe", callback=lambda _message: None)  # never acked
        for _ in range(60):
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                continue
            except amqp.exceptions.PreconditionFailed:
                return True
    return False


@pytest.mark.early
def test_a_first_sync_longer_than_the_consumer_timeout_completes_in_slices(
    database_url: str, secret_key: str, conn: db.Connection, tmp_path: Path,
) -> None:
    timeout_ms = 5000
    with private_node(tmp_path / "rabbitmq", consumer_timeout_ms=timeout_ms) as url:
        assert _consumer_timeout_is_enforced(url)
        env = services.deployment_env(
            database_url, url, secret_key, MAILFERRY_FETCHER_SLICE_SECONDS="1",
            MAILFERRY_BATCH_MAX_MESSAGES="10", MAILFERRY_PERSISTER_PREFETCH="1")
        processes = services.ServiceProcesses(env, tmp_path)
        with Dovecot(tmp_path / "dovecot") as server, \
                TcpProxy(server.host, server.port, latency=0.1) as proxy:
            expected = _fill(server, "eve", 300)
            mailbox_id = _add_mailboxes(env, proxy, ["eve"])["eve"]
            try:
                processes.start("fetcher")
                processes.start("persister")
                services.cli(env, "sync", "--mailbox", str(mailbox_id), "--wait",
                             "--timeout", "240", "--json")
                processes.assert_running()
                stored = _stored(env, mailbox_id)
                logs = processes.logs()
                fetcher_log = (tmp_path / "fetcher-0.log").read_text()
            finally:
                processes.stop()
        node_log = "\n".join(p.read_text(errors="replace")
                             for p in (tmp_path / "rabbitmq" / "log").glob("*.log"))

    run = conn.execute("SELECT status, started_at, finished_at, attempts FROM sync_runs"
                       ).fetchone()
    assert run["status"] == "done", logs
    assert (run["finished_at"] - run["started_at"]).total_seconds() > timeout_ms / 1000
    assert stored == expected
    slices = [json.loads(line) for line in fetcher_log.splitlines()
              if '"sync.sliced"' in line]
    assert len(slices) >= 2
    # No channel of the sync was closed by the broker: only the probe's delivery timed out.
    assert node_log.count("acknowledgement timed out") <= 1, node_log[-3000:]
    assert "broker.connection_lost" not in fetcher_log
    assert run["attempts"] == 0

