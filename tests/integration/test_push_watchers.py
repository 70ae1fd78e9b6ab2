"""The scheduler's watches against real PostgreSQL and Dovecot: schedulers share them fairly, a
joining one gets its part, a stopped one's are taken over; push runs do not postpone the schedule;
an OAuth2 mailbox's watch lives through its tokens' expiry (Dovecot's oauth2 passdb and the
devkit's fake provider). Manager passes are driven by hand (``pass_once``) so the story is
deterministic."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from mailferry import app, db, metrics, runs
from mailferry.app import oauth as app_oauth
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.hostile_imap import HostileImapServer
from mailferry.devkit.oauth_provider import FakeProvider
from mailferry.devkit.tcp_proxy import TcpProxy
from mailferry.messages import AnyMessage, CredentialsInvalid, SyncMailbox
from mailferry.services.scheduler.watchers import Watchers
from mailferry.sync_requests import due_mailboxes

USER = "alice@example.test"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        yield dovecot


def _mailboxes(conn: db.Connection, settings: Settings, server: Dovecot, count: int) -> list[int]:
    box = PasswordBox(settings.secret_key)
    ids = []
    for i in range(count):
        server.add_user(f"u{i}", "pw")
        ids.append(app.add_mailbox(conn, box, owner_email=None, host=server.host,
                                   port=server.port, security="none", username=f"u{i}",
                                   password="pw"))
    return ids


def _watchers(settings: Settings, name: str, published: list[AnyMessage]) -> Watchers:
    return Watchers(settings, name, published.append, PasswordBox(settings.secret_key))


def _watched(watchers: Watchers) -> dict[str, float]:
    """What the scheduler's metrics say: mailferry_scheduler_watched_mailboxes by state."""
    [family] = metrics.WatchCollector(watchers.states).collect()
    return {sample.labels["state"]: sample.value for sample in family.samples}


def _holders(conn: db.Connection) -> dict[str, int]:
    rows = conn.execute("""SELECT holder, count(*) AS n FROM mailbox_watches
                            WHERE holder IS NOT NULL AND lease_expires_at > now()
                            GROUP BY holder""").fetchall()
    return {r["holder"]: r["n"] for r in rows}


def test_schedulers_share_the_watches_and_take_over_a_stopped_ones(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    settings = settings.model_copy(update={"push_lease": 2.0})
    _mailboxes(conn, settings, server, 4)
    published: list[AnyMessage] = []
    first, second = _watchers(settings, "s1", published), _watchers(settings, "s2", published)
    try:
        first.pass_once()
        assert _holders(conn) == {"s1": 4}, "alone, a scheduler watches every mailbox"
        assert services.eventually(
            lambda: all(w.state == "watching" for w in first.watches.values()), 20)
        assert _watched(first) == {"watching": 4, "polling": 0, "backoff": 0, "off": 0}

        second.pass_once()  # joins: its heartbeat halves the fair share...
        first.pass_once()  # ...so the first gives two back...
        second.pass_once()  # ...and the second claims them
        assert _holders(conn) == {"s1": 2, "s2": 2}
        assert _watched(first)["watching"] == 2

        for watch in second.watches.values():  # the second dies without a word
            watch.stop()
        second.watches.clear()
        time.sleep(settings.push_lease + 0.2)
        first.pass_once()
        assert _holders(conn) == {"s1": 4}, "its leases expired: the first takes them over"
        tokens = conn.execute("SELECT min(token) AS t FROM mailbox_watches").fetchone()
        assert tokens is not None and tokens["t"] >= 1
    finally:
        first.stop()
        second.stop()


def test_a_scheduler_never_holds_more_watches_than_its_cap(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    settings = settings.model_copy(update={"push_max_connections": 2})
    _mailboxes(conn, settings, server, 3)
    watchers = _watchers(settings, "s1", [])
    try:
        watchers.pass_once()
        assert _holders(conn) == {"s1": 2}
    finally:
        watchers.stop()


def _oauth_mailbox(conn: db.Connection, settings: Settings, idp: FakeProvider, host: str,
                   port: int) -> int:
    box = PasswordBox(settings.secret_key)
    app_oauth.add_provider(conn, box, name="fake", kind="generic", client_id=idp.client_id,
                           token_url=f"{idp.url}/token")
    return app_oauth.add_oauth_mailbox(conn, box, owner_email=None, provider="fake",
                                       username=USER, refresh_token=idp.grant(USER), host=host,
                                       port=port, security="none")


def _credentials_invalid(conn: db.Connection, mailbox_id: int) -> bool:
    row = conn.execute("SELECT credentials_invalid_at FROM mailboxes WHERE id = %s",
                       (mailbox_id,)).fetchone()
    return row is not None and row["credentials_invalid_at"] is not None


def test_an_oauth2_watch_outlives_its_token_rides_out_an_outage_and_stops_at_a_revocation(
    conn: db.Connection, settings: Settings, tmp_path: Path,
) -> None:
    settings = settings.model_copy(update={"push_backoff_max": 0.5})
    with (FakeProvider(access_lifetime=2.0) as idp,
          Dovecot(tmp_path / "dovecot", oauth2_introspection_url=f"{idp.url}/introspect") as server,
          TcpProxy(server.host, server.port) as proxy):
        server.add_user(USER, "unused-password")
        mailbox_id = _oauth_mailbox(conn, settings, idp, proxy.host, proxy.port)
        published: list[AnyMessage] = []
        watchers = _watchers(settings, "s1", published)
        watchers.dispatcher.start()  # changes become SyncMailbox commands (passes stay by hand)
        try:
            watchers.pass_once()
            watch = watchers.watches[mailbox_id]
            assert services.eventually(lambda: watch.state == "watching", 20), watch.error
            assert idp.requests["refresh_token"] == 1, "logged in with a token from its row"

            # The token expires under the live session (Dovecot lets it go on, as Gmail does);
            # the server then drops the connection: a refreshed token, and the watch goes on.
            time.sleep(2.1)
            proxy.cut()
            assert services.eventually(lambda: idp.requests["refresh_token"] == 2
                                       and proxy.open_links() and watch.state == "watching", 20)
            server.append(USER, None, "INBOX", b"Subject: pushed\r\n\r\nafter expiry\r\n")
            asked = services.eventually(lambda: [m.requested_by for m in published
                                                 if isinstance(m, SyncMailbox)], 20)
            assert asked == ["push"]

            # The provider is down (500) when the next token is due: a backoff, nobody told.
            time.sleep(2.1)
            idp.fail_next("500", times=2)
            proxy.cut()
            assert services.eventually(lambda: idp.requests["refresh_token"] >= 4
                                       and watch.state == "watching", 30)
            watchers.pass_once()
            assert watch.auth_error is None and not _credentials_invalid(conn, mailbox_id)

            # Revoked: the grant is refused at the next refresh, as a sync's would be.
            idp.revoke(USER)
            time.sleep(2.1)
            proxy.cut()
            assert services.eventually(lambda: watch.auth_error, 20)
            watchers.pass_once()
            watchers.pass_once()
        finally:
            watchers.stop()
    told = [m for m in published if isinstance(m, CredentialsInvalid)]
    assert len(told) == 1 and "re-authorize" in told[0].error
    assert _credentials_invalid(conn, mailbox_id)
    assert mailbox_id not in watchers.watches


def test_a_watch_told_its_token_expired_logs_in_again_at_once_with_a_fresh_one(
    conn: db.Connection, settings: Settings,
) -> None:
    settings = settings.model_copy(update={"push_poll": 0.2})
    with (FakeProvider(access_lifetime=60.0) as idp,
          HostileImapServer("bye_mid_command", bye_commands=("STATUS",), bye_skip=1,
                            bye_text="Session invalidated - AccessTokenExpired",
                            capabilities=("IMAP4rev1", "SASL-IR", "AUTH=XOAUTH2")) as imap):
        mailbox_id = _oauth_mailbox(conn, settings, idp, imap.host, imap.port)
        watchers = _watchers(settings, "s1", [])
        try:
            with structlog.testing.capture_logs() as logs:
                watchers.pass_once()
                watch = watchers.watches[mailbox_id]
                # Polled once, then told BYE on the next poll: a new login with a new token.
                assert services.eventually(lambda: len(imap.bearer_tokens) == 2
                                           and watch.state == "polling", 20)
            events = [e["event"] for e in logs if e.get("mailbox_id", mailbox_id) == mailbox_id]
            assert "watch.reauthenticating" in events and "watch.backoff" not in events, logs
            assert len(set(imap.bearer_tokens)) == 2 and idp.requests["refresh_token"] == 2
            watchers.pass_once()
        finally:
            watchers.stop()
    assert watch.auth_error is None and not _credentials_invalid(conn, mailbox_id)


def test_an_app_only_mailbox_is_watched_with_a_client_credentials_token(
    conn: db.Connection, settings: Settings, tmp_path: Path,
) -> None:
    box = PasswordBox(settings.secret_key)
    with (FakeProvider(client_secret="tenant-app-secret") as idp,
          Dovecot(tmp_path / "dovecot", oauth2_introspection_url=f"{idp.url}/introspect",
                  oauth2_app_introspection_url=f"{idp.url}/introspect/app") as server):
        server.add_user(USER, "unused-password")
        app_oauth.add_provider(conn, box, name="tenant", kind="microsoft",
                               client_id=idp.client_id, client_secret="tenant-app-secret",
                               tenant="contoso.example", token_url=f"{idp.url}/token")
        mailbox_id = app_oauth.add_oauth_mailbox(
            conn, box, owner_email=None, provider="tenant", username=USER, refresh_token=None,
            app_only=True, host=server.host, port=server.port, security="none")
        watchers = _watchers(settings, "s1", [])
        try:
            watchers.pass_once()
            watch = watchers.watches[mailbox_id]
            assert services.eventually(lambda: watch.state == "watching", 20), watch.error
        finally:
            watchers.stop()
    assert idp.requests["client_credentials"] == 1 and watch.auth_error is None


def test_a_push_run_does_not_postpone_the_scheduled_sync(
    conn: db.Connection, settings: Settings, server: Dovecot,
) -> None:
    [mailbox_id] = _mailboxes(conn, settings, server, 1)
    run_id = runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False,
                          requested_by="push")
    assert run_id is not None
    runs.give_up(conn, run_id, mailbox_id, "done for this test")
    assert due_mailboxes(conn, 3600) == [mailbox_id]


def test_too_many_connections_is_a_backoff_never_invalid_credentials(
    conn: db.Connection, settings: Settings, tmp_path: Path,
) -> None:
    settings = settings.model_copy(update={"push_backoff_max": 0.5})
    with Dovecot(tmp_path / "limited", max_connections_per_user=1) as limited:
        [mailbox_id] = _mailboxes(conn, settings, limited, 1)
        watchers = _watchers(settings, "s1", [])
        occupant = limited.client("u0")  # the account's one connection is taken
        try:
            watchers.pass_once()
            watch = watchers.watches[mailbox_id]
            assert services.eventually(lambda: watch.state == "backoff" and watch.error, 20)
            assert "[LIMIT]" in str(watch.error) and watch.auth_error is None
            watchers.pass_once()
            row = conn.execute("SELECT credentials_invalid_at FROM mailboxes WHERE id = %s",
                               (mailbox_id,)).fetchone()
            assert row is not None and row["credentials_invalid_at"] is None
            occupant.logout()
            assert services.eventually(lambda: watch.state == "watching", 30), \
                "once a connection is free, the watch is up"
        finally:
            watchers.stop()
