"""OAuth2 mailboxes against a real Dovecot (oauth2 passdb) and the devkit's fake provider: the
token life cycle in the database (cache, refresh, rotation, one refresh at a time, refused and
unavailable grants, a provider's Retry-After honoured by the worker) and the SASL mechanisms on
the wire."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry import db, messages, metrics, oauth, topology
from mailferry.app import oauth as app_oauth
from mailferry.broker import Publisher, Worker
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.oauth_provider import FakeProvider
from mailferry.errors import ImapAuthError, ImapConnectionError, InvalidInput
from mailferry.imap import ImapConfig, ImapConnector, OAuth2Auth

USER = "alice@example.test"


@pytest.fixture
def idp() -> Iterator[FakeProvider]:
    with FakeProvider(access_lifetime=2.0) as provider:
        yield provider


@pytest.fixture
def server(tmp_path: Path, idp: FakeProvider) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot", oauth2_introspection_url=f"{idp.url}/introspect",
                 oauth2_app_introspection_url=f"{idp.url}/introspect/app") as dovecot:
        dovecot.add_user(USER, "unused-password")
        yield dovecot


@pytest.fixture
def box(secret_key: str) -> PasswordBox:
    from pydantic import SecretStr
    return PasswordBox(SecretStr(secret_key))


def _mailbox(conn: db.Connection, box: PasswordBox, idp: FakeProvider, server: Dovecot,
             refresh_token: str) -> int:
    app_oauth.add_provider(conn, box, name="fake", kind="generic", client_id=idp.client_id,
                           token_url=f"{idp.url}/token")
    return app_oauth.add_oauth_mailbox(conn, box, owner_email=None, provider="fake",
                                       username=USER, refresh_token=refresh_token,
                                       host=server.host, port=server.port, security="none")


def refreshes(outcome: str) -> float:
    """This process's token requests with that outcome (mailferry_fetcher_token_refreshes)."""
    return sum(sample.value for family in metrics.TOKEN_REFRESHES.collect()
               for sample in family.samples
               if sample.name.endswith("_total") and sample.labels["outcome"] == outcome)


def _login(server: Dovecot, token: str, user: str = USER) -> None:
    config = ImapConfig(server.host, server.port, "none", user, "", timeout=5,
                        allow_private_networks=True)
    with ImapConnector(config, OAuth2Auth(lambda fresh=False: token)) as connector:
        connector.connect()
        assert connector.client.select_folder("INBOX")


def test_dovecot_accepts_exactly_the_tokens_the_provider_issued_and_not_yet_expired(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    token = oauth.MailboxTokens(conn, box, mailbox_id)()
    _login(server, token)
    with pytest.raises(ImapAuthError):
        _login(server, "at-never-issued")
    time.sleep(2.1)
    with pytest.raises(ImapAuthError):
        _login(server, token)


def test_xoauth2_is_used_when_the_server_does_not_offer_oauthbearer(
        tmp_path: Path, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    with Dovecot(tmp_path / "d2", oauth2_introspection_url=f"{idp.url}/introspect",
                 oauth2_mechanisms=["xoauth2"]) as server:
        server.add_user(USER, "unused-password")
        mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
        _login(server, oauth.MailboxTokens(conn, box, mailbox_id)())
        assert f"user=<{USER}>, method=XOAUTH2" in server.log_file.read_text()


def test_oauthbearer_is_preferred_when_offered(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    _login(server, oauth.MailboxTokens(conn, box, mailbox_id)())
    assert f"user=<{USER}>, method=OAUTHBEARER" in server.log_file.read_text()


def test_a_cached_token_is_reused_until_a_fifth_of_its_life_is_left_then_refreshed_and_rotated(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    idp.rotate = True
    first_refresh = idp.grant(USER)
    mailbox_id = _mailbox(conn, box, idp, server, first_refresh)
    tokens = oauth.MailboxTokens(conn, box, mailbox_id)
    refreshed = refreshes("refreshed")
    first = tokens()
    assert tokens() == first and idp.requests["refresh_token"] == 1
    time.sleep(1.7)  # 2 s tokens: less than 20% left
    second = tokens()
    assert second != first and idp.requests["refresh_token"] == 2
    row = conn.execute("SELECT refresh_token_encrypted FROM oauth_tokens").fetchone()
    stored = box.decrypt(bytes(row["refresh_token_encrypted"]))
    assert stored != first_refresh and stored in idp.issued  # the rotated one, stored at once
    time.sleep(1.7)
    _login(server, tokens())  # the rotated refresh token works; the old one is dead
    assert idp.requests["refresh_token"] == 3
    assert refreshes("refreshed") - refreshed == 3  # and the metric counted each


def test_two_fetchers_asking_at_once_refresh_the_token_once(
        server: Dovecot, idp: FakeProvider, database_url: str, conn: db.Connection,
        box: PasswordBox) -> None:
    idp.rotate = True
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    idp.fail_next("slow", seconds=0.5)  # the first refresh is slow: the others wait for it
    got: list[str] = []

    def fetcher() -> None:
        with db.connect(database_url, autocommit=True) as own:
            got.append(oauth.MailboxTokens(own, box, mailbox_id)())

    threads = [threading.Thread(target=fetcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 1 and len(got) == 4
    assert idp.requests["refresh_token"] == 1


def test_a_refused_grant_is_refused_credentials_with_the_command_that_fixes_it(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    idp.revoke(USER)
    before = refreshes("refused")
    with pytest.raises(ImapAuthError) as refused:
        oauth.MailboxTokens(conn, box, mailbox_id)()
    assert refreshes("refused") - before == 1
    assert "invalid_grant" in str(refused.value)
    assert f"mailferry mailbox update {mailbox_id} --refresh-token-stdin" in str(refused.value)
    row = conn.execute("SELECT last_refresh_error FROM oauth_tokens").fetchone()
    assert "invalid_grant" in row["last_refresh_error"]


@pytest.mark.parametrize("fault", ["500", "429"])
def test_an_unavailable_token_endpoint_is_transient(
        fault: str, server: Dovecot, idp: FakeProvider, conn: db.Connection,
        box: PasswordBox) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    idp.fail_next(fault, seconds=7)
    before = refreshes("unavailable")
    with pytest.raises(ImapConnectionError) as unavailable:
        oauth.MailboxTokens(conn, box, mailbox_id)()
    assert refreshes("unavailable") - before == 1
    assert not isinstance(unavailable.value, ImapAuthError)
    assert f"HTTP {fault}" in str(unavailable.value)
    assert unavailable.value.retry_after == (7.0 if fault == "429" else None)
    _login(server, oauth.MailboxTokens(conn, box, mailbox_id)())  # and the next try works


def test_a_429_with_retry_after_makes_the_workers_retry_wait_at_least_that_long(
        server: Dovecot, idp: FakeProvider, database_url: str, conn: db.Connection,
        box: PasswordBox, settings: Settings) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    idp.fail_next("429", seconds=1)
    delays = (0.2, 1.0)  # the first retry would wait 0.2 s; the provider asks for 1 s
    tried: list[float] = []
    got: list[str] = []

    def handler(_command: messages.SyncMailbox) -> None:
        tried.append(time.monotonic())
        with db.connect(database_url, autocommit=True) as own:
            got.append(oauth.MailboxTokens(own, box, mailbox_id)())

    publisher = Publisher(settings.broker_url, delays)
    worker = Worker(url=settings.broker_url, work=topology.FETCHER,
                    handlers={messages.SyncMailbox: handler}, publisher=publisher,
                    retry_delays=delays)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        publisher.publish(messages.SyncMailbox(run_id=uuid.uuid4(), mailbox_id=mailbox_id))
        assert services.eventually(lambda: got, timeout=10)
    finally:
        worker.should_stop = True
        thread.join(timeout=10)
        publisher.close()
    assert len(tried) == 2 and tried[1] - tried[0] >= 1.0
    assert idp.requests["refresh_token"] == 2


def test_a_token_endpoint_that_is_too_slow_is_transient(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    idp.fail_next("slow", seconds=1.5)
    with pytest.raises(ImapConnectionError, match="did not answer in time"):
        oauth.MailboxTokens(conn, box, mailbox_id, timeout=0.5)()


def test_a_token_refused_by_the_server_is_refreshed_once_and_the_login_goes_on(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    tokens = oauth.MailboxTokens(conn, box, mailbox_id)
    tokens()
    idp.expire_access_tokens()  # cut short by the provider: the cache still thinks it fresh
    config = ImapConfig(server.host, server.port, "none", USER, "", timeout=5,
                        allow_private_networks=True)
    with ImapConnector(config, OAuth2Auth(tokens)) as connector:
        connector.connect()
    assert idp.requests["refresh_token"] == 2


@pytest.mark.parametrize("url", ["http://idp.example.com/token", "ftp://127.0.0.1/token",
                                 "http://10.0.0.1/token"])
def test_token_endpoints_must_be_https_except_on_loopback(
        url: str, conn: db.Connection, box: PasswordBox) -> None:
    with pytest.raises(InvalidInput, match="https://"):
        app_oauth.add_provider(conn, box, name="x", kind="generic", client_id="c", token_url=url)
    for ok in ("https://idp.example.com/token", "http://127.0.0.1:8080/token",
               "http://[::1]:8080/token"):
        assert oauth.check_endpoint(ok, "url") == ok


def test_a_google_service_account_signs_in_as_the_mailbox_user_with_a_jwt_bearer_grant(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox,
        tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.service_account_public_key = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    account = json.dumps({"type": "service_account", "client_email": "sync@proj.iam.example",
                          "private_key_id": "k1", "private_key": private})
    app_oauth.add_provider(conn, box, name="workspace", kind="google", client_id="sync",
                           token_url=f"{idp.url}/token", service_account_key=account)
    stored = conn.execute("SELECT service_account_key_encrypted FROM oauth_providers").fetchone()
    assert b"PRIVATE KEY" not in bytes(stored["service_account_key_encrypted"])
    mailbox_id = app_oauth.add_oauth_mailbox(
        conn, box, owner_email=None, provider="workspace", username=USER, refresh_token=None,
        app_only=True, host=server.host, port=server.port, security="none")
    _login(server, oauth.MailboxTokens(conn, box, mailbox_id)())  # the token is USER's
    assert idp.requests[oauth.JWT_BEARER] == 1
    assert idp.scopes[oauth.JWT_BEARER] == "https://mail.google.com/"


def test_microsoft_app_only_access_uses_client_credentials_with_the_default_scope(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    idp.client_secret = "tenant-app-secret"
    app_oauth.add_provider(conn, box, name="tenant", kind="microsoft", client_id=idp.client_id,
                           client_secret="tenant-app-secret", tenant="contoso.example",
                           token_url=f"{idp.url}/token")
    mailbox_id = app_oauth.add_oauth_mailbox(
        conn, box, owner_email=None, provider="tenant", username=USER, refresh_token=None,
        app_only=True, host=server.host, port=server.port, security="none")
    token = oauth.MailboxTokens(conn, box, mailbox_id)()
    # A token for the app: any mailbox of its tenant's domain, none elsewhere, no user's own.
    server.add_user("bob@example.test", "unused-password")
    server.add_user("eve@elsewhere.test", "unused-password")
    _login(server, token)
    _login(server, token, "bob@example.test")
    with pytest.raises(ImapAuthError):
        _login(server, token, "eve@elsewhere.test")
    with pytest.raises(ImapAuthError):  # a person's token stays that person's
        _login(server, oauth.MailboxTokens(conn, box, _mailbox(conn, box, idp, server,
                                                                idp.grant(USER)))(),
               "bob@example.test")
    assert idp.requests["client_credentials"] == 1
    assert idp.scopes["client_credentials"] == "https://outlook.office365.com/.default"
    listed = app_oauth.list_providers(conn)[0]
    assert listed["authorize_url"].startswith("https://login.microsoftonline.com/contoso.example/")
    assert listed["has_client_secret"] and "client_secret" not in listed


def test_the_cli_registers_app_only_mailboxes_with_a_preset_and_never_prints_a_secret(
        env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "account.json"
    key_file.write_text(json.dumps({"client_email": "sync@proj.iam.example",
                                    "private_key": "-----BEGIN PRIVATE KEY-----\nsecret-key"}))
    added = services.run_cli(["oauth", "provider", "add", "--name", "workspace", "--kind",
                              "google", "--client-id", "sync", "--client-secret-stdin",
                              "--service-account-key-file", str(key_file)], env,
                             stdin=b"the-client-secret\n")
    assert added.returncode == 0, added.stderr
    mailbox = services.cli(env, "mailbox", "add", "--system", "--auth", "oauth2-app",
                           "--oauth-provider", "workspace", "--preset", "gmail", "--username", USER)
    listed = services.run_cli(["mailbox", "list", "--json"], env)
    row = json.loads(listed.stdout)[0]
    assert row["id"] == mailbox["id"] and row["auth_kind"] == "oauth2-app"
    assert (row["host"], row["port"], row["security"]) == ("imap.gmail.com", 993, "ssl")
    providers = services.run_cli(["oauth", "provider", "list"], env)
    shown = b"".join([added.stdout, added.stderr, listed.stdout, providers.stdout])
    assert b"workspace" in providers.stdout
    assert b"secret-key" not in shown and b"the-client-secret" not in shown
    refused = services.run_cli(["oauth", "provider", "add", "--name", "x", "--kind", "generic",
                                "--client-id", "c", "--token-url", "http://idp.example/token"],
                               env)
    assert refused.returncode == 2 and b"must be https://" in refused.stderr


def test_removing_an_oauth2_mailbox_removes_its_tokens(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    from mailferry import app

    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    oauth.MailboxTokens(conn, box, mailbox_id)()
    app.remove_mailbox(conn, mailbox_id)
    assert conn.execute("SELECT count(*) AS n FROM oauth_tokens").fetchone() == {"n": 0}
    assert app_oauth.list_providers(conn)[0]["mailboxes"] == 0


def test_an_oauth2_mailbox_takes_no_password(
        server: Dovecot, idp: FakeProvider, conn: db.Connection, box: PasswordBox) -> None:
    from mailferry import app
    from mailferry.errors import ConfigError

    mailbox_id = _mailbox(conn, box, idp, server, idp.grant(USER))
    with pytest.raises(ConfigError, match="--refresh-token-stdin"):
        app.update_mailbox(conn, box, lambda _m: None, mailbox_id,
                           app.MailboxChanges(password="hunter2"))
