"""OAuth2 mailboxes through the whole pipeline (fetcher, persister, notifier as processes), against
Dovecot's oauth2 passdb and the devkit's fake provider, whose access tokens last two seconds:
expiry, rotation, outages, revocation, one refresh when several processes want the token at
once, and app-only access (Microsoft client credentials, Google service accounts)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailferry import db, oauth, topology
from mailferry.app import oauth as app_oauth
from mailferry.broker import Publisher, connect
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.hostile_imap import HostileImapServer
from mailferry.devkit.oauth_provider import FakeProvider
from mailferry.messages import SyncMailbox

USER = "alice@example.test"
OWNER = "owner@example.com"
CLIENT_SECRET = "client-secret-never-shown"


@pytest.fixture
def idp() -> Iterator[FakeProvider]:
    with FakeProvider(access_lifetime=2.0, rotate=True, client_secret=CLIENT_SECRET) as provider:
        yield provider


@pytest.fixture
def server(tmp_path: Path, idp: FakeProvider) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot", oauth2_introspection_url=f"{idp.url}/introspect",
                 oauth2_app_introspection_url=f"{idp.url}/introspect/app") as dovecot:
        dovecot.add_user(USER, "unused-password")
        with dovecot.session(USER) as imap:
            imap.append("INBOX", b"Subject: one\r\n\r\nfirst\r\n")
        yield dovecot


@pytest.fixture
def pipeline(processes: services.ServiceProcesses) -> services.ServiceProcesses:
    for service in ("fetcher", "persister", "notifier"):
        processes.start(service)
    return processes


class Capture:
    """Every event published on the events exchange, kept to grep for secrets."""

    def __init__(self, broker_url: str) -> None:
        self.conn = connect(broker_url)
        channel = self.conn.default_channel
        topology.EVENTS(channel).declare()
        self.queue = channel.queue_declare(queue="", exclusive=True).queue
        channel.queue_bind(self.queue, topology.EVENTS.name, "#")

    def bodies(self) -> str:
        out = []
        while (message := self.conn.default_channel.basic_get(self.queue, no_ack=True)):
            body = message.body
            out.append(body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body))
        return "\n".join(out)


def _cli(env: dict[str, str], outputs: list[str], *args: str, stdin: bytes | None = None) -> Any:
    result = services.run_cli(list(args), env, stdin=stdin)
    outputs.append(result.stdout.decode() + result.stderr.decode())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else None


def _provider(env: dict[str, str], outputs: list[str], idp: FakeProvider) -> None:
    _cli(env, outputs, "oauth", "provider", "add", "--name", "fake", "--kind", "generic",
         "--client-id", idp.client_id, "--client-secret-stdin", "--token-url",
         f"{idp.url}/token", stdin=CLIENT_SECRET.encode() + b"\n")


def _sync(env: dict[str, str], outputs: list[str], mailbox_id: int) -> str:
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "60",
                               "--json"], env)
    outputs.append(result.stdout.decode() + result.stderr.decode())
    return str(json.loads(result.stdout)[0]["status"])


def _told(env: dict[str, str]) -> list[str]:
    return [n["kind"] for n in services.cli(env, "notifications", "list", "--user", OWNER,
                                            "--json")]


def _told_at_least(env: dict[str, str], count: int) -> list[str] | None:
    kinds = _told(env)
    return kinds if len(kinds) >= count else None


@pytest.mark.early
def test_an_oauth2_mailbox_syncs_through_expiry_rotation_outages_and_a_revocation(
        env: dict[str, str], idp: FakeProvider, server: Dovecot, conn: db.Connection,
        pipeline: services.ServiceProcesses, tmp_path: Path) -> None:
    outputs: list[str] = []
    capture = Capture(env["MAILFERRY_BROKER_URL"])
    services.cli(env, "user", "add", "--email", OWNER)
    _provider(env, outputs, idp)
    first_grant = idp.grant(USER)
    mailbox_id = int(_cli(env, outputs, "mailbox", "add", "--owner", OWNER, "--auth", "oauth2",
                          "--oauth-provider", "fake", "--host", server.host, "--port",
                          str(server.port), "--security", "none", "--username", USER,
                          "--refresh-token-stdin", stdin=first_grant.encode() + b"\n")["id"])
    assert _sync(env, outputs, mailbox_id) == "done"

    # Between syncs the access token expires: the next sync refreshes it, and the provider
    # rotates the refresh token, which is stored at once (the first grant is dead now).
    time.sleep(2.1)
    with server.session(USER) as imap:
        imap.append("INBOX", b"Subject: two\r\n\r\nsecond\r\n")
    assert _sync(env, outputs, mailbox_id) == "done"
    assert idp.requests["refresh_token"] == 2
    stored = conn.execute("SELECT count(*) AS n FROM messages").fetchone()
    assert stored == {"n": 2}

    # The provider fails (500, then 429): retried with back-off, and nobody is told.
    time.sleep(2.1)
    idp.fail_next("500")
    idp.fail_next("429", seconds=1)
    assert _sync(env, outputs, mailbox_id) == "done"
    assert _told(env) == []

    listed = _cli(env, outputs, "mailbox", "list", "--json")[0]
    assert listed["auth_kind"] == "oauth2"
    assert listed["token_expires_at"] and listed["token_refreshed_at"]

    # Revoked: the same path as a wrong password, told once.
    idp.revoke(USER)
    time.sleep(2.1)
    assert _sync(env, outputs, mailbox_id) == "failed"
    assert _sync(env, outputs, mailbox_id) == "failed"
    kinds = services.eventually(lambda: _told(env) or None)
    assert kinds == ["credentials_invalid"]
    note = services.cli(env, "notifications", "list", "--user", OWNER, "--json")[0]
    assert "OAuth2" in note["title"] and "--refresh-token-stdin" in note["body"]

    # Re-authorized: a new refresh token syncs at once and the owner is told once.
    updated = _cli(env, outputs, "mailbox", "update", str(mailbox_id), "--refresh-token-stdin",
                   stdin=idp.grant(USER).encode() + b"\n")
    run = services.eventually(lambda: conn.execute(
        "SELECT status FROM sync_runs WHERE id = %s AND status = 'done'",
        (updated["run_id"],)).fetchone())
    assert run == {"status": "done"}
    kinds = services.eventually(lambda: _told_at_least(env, 2))
    assert kinds == ["credentials_invalid", "credentials_restored"]
    pipeline.assert_running()

    # No token, refresh token or client secret anywhere people or other programs can see.
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    seen = {"logs": logs, "broker": capture.bodies(), "cli": "\n".join(outputs),
            "notifications": json.dumps(services.cli(env, "notifications", "list", "--user",
                                                     OWNER, "--all", "--json"))}
    assert "sync.fetched" in logs and seen["broker"]
    secrets = [*idp.issued, CLIENT_SECRET]
    assert len(idp.issued) > 4
    for where, text in seen.items():
        leaked = [s for s in secrets if s in text]
        assert leaked == [], f"{where} shows a secret"


def test_a_sync_that_outlives_its_token_logs_in_again_and_goes_on(
        env: dict[str, str], idp: FakeProvider, pipeline: services.ServiceProcesses) -> None:
    outputs: list[str] = []
    with HostileImapServer("bye_mid_command", messages=3, bye_times=1,
                           bye_text="Session invalidated - AccessTokenExpired",
                           capabilities=("IMAP4rev1", "SASL-IR", "AUTH=XOAUTH2", "ENABLE",
                                         "NAMESPACE")) as imap:
        _provider(env, outputs, idp)
        services.cli(env, "user", "add", "--email", OWNER)
        mailbox_id = int(_cli(
            env, outputs, "mailbox", "add", "--owner", OWNER, "--auth", "oauth2",
            "--oauth-provider", "fake", "--host", imap.host, "--port", str(imap.port),
            "--security", "none", "--username", USER, "--refresh-token-stdin",
            "--first-sync-days", "36500", stdin=idp.grant(USER).encode() + b"\n")["id"])
        assert _sync(env, outputs, mailbox_id) == "done"
        # One attempt: logged in, told BYE AccessTokenExpired, refreshed, logged in again.
        assert len(imap.bearer_tokens) == 2 and len(set(imap.bearer_tokens)) == 2
        assert idp.requests["refresh_token"] == 2
    stored = services.cli(env, "messages", "list", "--mailbox", str(mailbox_id), "--folder",
                          "INBOX", "--json")
    assert sorted(m["uid"] for m in stored) == [1, 2, 3]
    assert _told(env) == []


def _waiting_on_a_token_row(conn: db.Connection) -> bool:
    """Whether some session of this database waits for the lock on an ``oauth_tokens`` row."""
    row = conn.execute(
        """SELECT count(*) AS n FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'
              AND query ILIKE '%oauth_tokens%'""").fetchone()
    return bool(row and row["n"])


def test_two_fetchers_and_a_check_that_want_one_expired_token_at_once_refresh_it_once(
        env: dict[str, str], idp: FakeProvider, server: Dovecot, conn: db.Connection,
        settings: Settings, processes: services.ServiceProcesses, tmp_path: Path) -> None:
    # Two fetcher processes taking one command at a time: while one is busy, the other gets
    # the next command. Their one retry comes after the run is over: with the tests' 1, 2, 4 s,
    # a loaded machine could use up the duplicate's retries while the first sync still runs,
    # and a command given up closes its run as failed.
    processes.start("fetcher", count=2, env={"MAILFERRY_FETCHER_CONCURRENCY": "1",
                                             "MAILFERRY_RETRY_DELAYS": "30"})
    processes.start("persister")
    outputs: list[str] = []
    box = PasswordBox(settings.secret_key)
    app_oauth.add_provider(conn, box, name="fake", kind="generic", client_id=idp.client_id,
                           client_secret=CLIENT_SECRET, token_url=f"{idp.url}/token")
    mailbox_id = app_oauth.add_oauth_mailbox(
        conn, box, owner_email=None, provider="fake", username=USER,
        refresh_token=idp.grant(USER), host=server.host, port=server.port, security="none")
    oauth.MailboxTokens(conn, box, mailbox_id)()  # an access token, cached
    time.sleep(2.1)  # and expired: whoever uses the mailbox next refreshes it

    # The next refresh stays in flight until released, and gives a token that outlives the
    # wait (its lifetime counts from when it was asked for).
    idp.fail_next("hold")
    idp.access_lifetime = 60.0
    with ThreadPoolExecutor(2) as pool:
        try:
            syncing = pool.submit(_sync, env, outputs, mailbox_id)
            assert services.eventually(idp.holding, timeout=20)  # one fetcher is refreshing
            # The same command again (as a redelivery would be): the other fetcher takes it.
            # (still `queued`: the attempt holds its SyncStarted until it has more to say)
            run = conn.execute("SELECT id FROM sync_runs WHERE mailbox_id = %s "
                               "AND status IN ('queued', 'running')", (mailbox_id,)).fetchone()
            assert run is not None
            publisher = Publisher(settings.broker_url, settings.retry_delays)
            publisher.publish(SyncMailbox(run_id=run["id"], mailbox_id=mailbox_id))
            publisher.close()
            # And someone checks the mailbox from the CLI, a process that takes no lease.
            checking = pool.submit(services.run_cli,
                                   ["mailbox", "check", str(mailbox_id), "--json"], env)
            assert services.eventually(lambda: _waiting_on_a_token_row(conn), timeout=20)
            # The other fetcher wanted the mailbox too: the lease held it back (retried later).
            assert services.eventually(lambda: any(
                "LeaseHeld" in log.read_text() for log in tmp_path.glob("fetcher-*.log")),
                timeout=20)
        finally:
            idp.release()
        assert syncing.result(timeout=60) == "done"
        checked = checking.result(timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

    # Two refreshes in all: the first token's, then one for the three that wanted it at once.
    # With rotation, each refresh token was presented once, never twice.
    assert idp.requests["refresh_token"] == 2
    assert sorted(idp.refreshes.values()) == [1, 1]
    processes.assert_running()


def _service_account(idp: FakeProvider) -> str:
    """A Google service account's JSON key, whose public half the fake provider knows."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.service_account_public_key = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return json.dumps({"type": "service_account", "client_email": "sync@proj.iam.example",
                       "private_key_id": "k1", "private_key": private})


def test_app_only_mailboxes_of_microsoft_and_google_sync_end_to_end(
        env: dict[str, str], idp: FakeProvider, server: Dovecot, conn: db.Connection,
        settings: Settings, pipeline: services.ServiceProcesses, tmp_path: Path) -> None:
    box = PasswordBox(settings.secret_key)
    # Microsoft: the client credentials grant, a token for the app, for any mailbox of the
    # tenant. Google: a service account's JWT bearer grant, a token for the mailbox's user.
    app_oauth.add_provider(conn, box, name="m365-app", kind="microsoft", client_id=idp.client_id,
                           client_secret=CLIENT_SECRET, tenant="contoso.example",
                           token_url=f"{idp.url}/token")
    account = _service_account(idp)
    app_oauth.add_provider(conn, box, name="workspace", kind="google", client_id="sync",
                           token_url=f"{idp.url}/token", service_account_key=account)
    bob = "bob@example.test"
    server.add_user(bob, "unused-password")
    with server.session(bob) as imap:
        imap.append("INBOX", b"Subject: for bob\r\n\r\nbody\r\n")
    mailboxes = {
        app_oauth.add_oauth_mailbox(conn, box, owner_email=None, provider=provider,
                                    username=user, refresh_token=None, app_only=True,
                                    host=server.host, port=server.port, security="none"): user
        for provider, user in (("m365-app", bob), ("workspace", USER))}

    result = services.run_cli(["sync", *[f"--mailbox={m}" for m in mailboxes], "--wait",
                               "--timeout", "60", "--json"], env)
    assert [run["status"] for run in json.loads(result.stdout)] == ["done", "done"]
    services.wait_parsed(env["MAILFERRY_DATABASE_URL"])
    stored = conn.execute("SELECT mailbox_id, subject FROM messages ORDER BY mailbox_id"
                          ).fetchall()
    assert [(r["mailbox_id"], r["subject"]) for r in stored] == list(
        zip(mailboxes, ["for bob", "one"], strict=True))
    assert idp.requests["client_credentials"] == 1
    assert idp.requests[oauth.JWT_BEARER] == 1
    assert idp.requests["refresh_token"] == 0  # app-only: no refresh token anywhere
    logins = server.log_file.read_text()
    assert f"user=<{bob}>, method=OAUTHBEARER" in logins
    assert f"user=<{USER}>, method=OAUTHBEARER" in logins

    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert "sync.fetched" in logs
    private_key = json.loads(account)["private_key"].splitlines()[1]
    leaked = [s for s in (*idp.issued, CLIENT_SECRET, private_key)
              if s in logs or s in result.stdout.decode() + result.stderr.decode()]
    assert leaked == []
    pipeline.assert_running()
