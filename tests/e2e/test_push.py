"""Push: with the schedule an hour apart, changes on the server reach the store in seconds, with
no `sync` command, whatever the server offers (NOTIFY, IDLE only, neither); a scheduler killed
while holding watches is replaced by another; a cut connection is re-established; a refused
login marks the credentials invalid; `--no-push` ends the watch; an OAuth2 mailbox is watched
through its tokens' expiry, until its grant is revoked."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.faults import sql
from mailferry.devkit.oauth_provider import FakeProvider
from mailferry.devkit.tcp_proxy import TcpProxy

PASSWORD = "secret"
PUSH_ENV = {
    "MAILFERRY_PUSH": "1",
    "MAILFERRY_SYNC_INTERVAL": "3600",  # the schedule cannot be what brings the mail
    "MAILFERRY_PUSH_LEASE": "3",
    "MAILFERRY_PUSH_POLL": "1",
    "MAILFERRY_PUSH_DEBOUNCE": "0.2",
    "MAILFERRY_PUSH_BACKOFF_MAX": "1",
}


def _add_mailbox(env: dict[str, str], server: Dovecot, port: int | None = None) -> int:
    services.cli(env, "user", "add", "--email", "alice@example.com")
    return int(services.cli(env, "mailbox", "add", "--owner", "alice@example.com",
                            "--host", server.host, "--port", str(port or server.port),
                            "--security", "none", "--username", "alice",
                            "--folders", "INBOX,Work", "--password-stdin",
                            stdin=PASSWORD.encode() + b"\n")["id"])


def _rows(env: dict[str, str], mailbox_id: int) -> list[dict[str, Any]]:
    return sql(env["MAILFERRY_DATABASE_URL"],
               """SELECT f.raw_name AS folder, mf.uid, mf.flags, mf.expunged_at IS NOT NULL AS gone
                    FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
                   WHERE f.mailbox_id = %s ORDER BY f.raw_name, mf.uid""", (mailbox_id,))


def _stored(env: dict[str, str], mailbox_id: int, folder: str, uid: int,
            timeout: float = 30) -> dict[str, Any]:
    row = services.eventually(
        lambda: next((r for r in _rows(env, mailbox_id)
                      if r["folder"] == folder and r["uid"] == uid), None), timeout=timeout)
    assert row, f"{folder} UID {uid} never reached the store"
    return row


def _watch(env: dict[str, str], mailbox_id: int) -> dict[str, Any]:
    rows = sql(env["MAILFERRY_DATABASE_URL"],
               "SELECT * FROM mailbox_watches WHERE mailbox_id = %s", (mailbox_id,))
    return rows[0] if rows else {}


def _watched(env: dict[str, str], mailbox_id: int, holder: str | None = None) -> dict[str, Any]:
    """The watch once it is up with both folders known (after the first sync listed them)."""
    row = services.eventually(
        lambda: (w if (w := _watch(env, mailbox_id)).get("state") in ("watching", "polling")
                 and (holder is None or w["holder"] != holder) else None), timeout=30)
    assert row, f"mailbox {mailbox_id} is not watched: {_watch(env, mailbox_id)}"
    return row


def _first_sync_done(env: dict[str, str], mailbox_id: int) -> None:
    assert services.eventually(lambda: sql(
        env["MAILFERRY_DATABASE_URL"],
        "SELECT 1 FROM sync_runs WHERE mailbox_id = %s AND status = 'done'", (mailbox_id,)),
        timeout=60)


@pytest.mark.parametrize(("hidden", "mode"), [((), "notify"), (("NOTIFY",), "idle"),
                                               (("NOTIFY", "IDLE"), "status")])
def test_new_flagged_and_expunged_mail_reaches_the_store_without_a_sync_command(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
    hidden: tuple[str, ...], mode: str,
) -> None:
    env = {**env, **PUSH_ENV}
    with Dovecot(tmp_path / "dovecot", capabilities_hidden=hidden) as server:
        server.add_user("alice", PASSWORD)
        server.create_folder("alice", "Work")
        mailbox_id = _add_mailbox(env, server)
        processes.env.update(env)
        for service in ("scheduler", "fetcher", "persister"):
            processes.start(service)
        _first_sync_done(env, mailbox_id)
        services.eventually(lambda: _watch(env, mailbox_id).get("mode") == mode, timeout=30)

        inbox_uid = server.append("alice", None, "INBOX", b"Subject: one\r\n\r\npushed\r\n")
        work_uid = server.append("alice", None, "Work", b"Subject: two\r\n\r\npushed\r\n")
        assert inbox_uid and work_uid
        assert not _stored(env, mailbox_id, "INBOX", inbox_uid)["gone"]
        assert not _stored(env, mailbox_id, "Work", work_uid)["gone"]

        with server.session("alice") as imap:
            imap.select_folder("Work")
            imap.add_flags([work_uid], [b"\\Flagged"])
            imap.select_folder("INBOX")
            imap.delete_messages([inbox_uid])
            imap.expunge()
        assert services.eventually(
            lambda: "\\Flagged" in _stored(env, mailbox_id, "Work", work_uid)["flags"], 30)
        assert services.eventually(
            lambda: _stored(env, mailbox_id, "INBOX", inbox_uid)["gone"], 30)

        asked = {r["requested_by"] for r in sql(
            env["MAILFERRY_DATABASE_URL"],
            "SELECT requested_by FROM sync_runs WHERE mailbox_id = %s", (mailbox_id,))}
        assert asked == {"scheduler", "push"}, "one scheduled sync, then only push"
        assert services.eventually(lambda: {r["status"] for r in sql(
            env["MAILFERRY_DATABASE_URL"], "SELECT status FROM sync_runs WHERE mailbox_id = %s",
            (mailbox_id,))} == {"done"}, 30), "push runs (which list no folders) end"
        processes.assert_running()


def test_a_killed_schedulers_watches_are_taken_over_and_a_cut_connection_comes_back(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
) -> None:
    env = {**env, **PUSH_ENV}
    with Dovecot(tmp_path / "dovecot") as server, TcpProxy(server.host, server.port) as proxy:
        server.add_user("alice", PASSWORD)
        server.create_folder("alice", "Work")
        mailbox_id = _add_mailbox(env, server, port=proxy.port)
        processes.env.update(env)
        for service in ("scheduler", "scheduler", "fetcher", "persister"):
            processes.start(service)
        _first_sync_done(env, mailbox_id)
        first = _watched(env, mailbox_id)

        before = proxy.accepted
        proxy.cut()  # the watch's connection drops: it is re-established
        assert services.eventually(lambda: proxy.accepted > before and proxy.open_links(), 30)
        uid = server.append("alice", None, "Work", b"Subject: after the cut\r\n\r\nx\r\n")
        assert uid
        _stored(env, mailbox_id, "Work", uid)

        holder = first["holder"]
        victim = next(p for name, p in processes.processes
                      if name == "scheduler" and holder.endswith(f":{p.pid}"))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        processes.processes = [(n, p) for n, p in processes.processes if p is not victim]
        uid = server.append("alice", None, "INBOX", b"Subject: after the kill\r\n\r\nx\r\n")
        assert uid
        taken = _watched(env, mailbox_id, holder=holder)
        assert taken["token"] > first["token"], "the new holder's token fences the old one"
        _stored(env, mailbox_id, "INBOX", uid)
        listed = services.cli(env, "mailbox", "list", "--json")[0]
        assert (listed["watch"], listed["watch_holder"]) == ("watching", taken["holder"])
        assert services.cli(env, "status", "--json")["watches"] == {"watching": 1}

        server.set_password("alice", "changed")
        proxy.cut()  # the watch logs in again, and is refused
        assert services.eventually(
            lambda: services.cli(env, "mailbox", "list", "--json")[0]["credentials_invalid"], 30)
        # The watch's own refused login, or a sync's that came first (the watch then stops at
        # its next look at the mailbox): either way it ends, never trying the password again.
        assert services.eventually(
            lambda: services.cli(env, "mailbox", "list", "--json")[0]["watch"] == "off", 30)


def test_a_mailbox_with_push_off_is_not_watched(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
) -> None:
    env = {**env, **PUSH_ENV}
    with Dovecot(tmp_path / "dovecot") as server:
        server.add_user("alice", PASSWORD)
        server.create_folder("alice", "Work")
        mailbox_id = _add_mailbox(env, server)
        processes.env.update(env)
        processes.start("scheduler")
        _watched(env, mailbox_id)
        services.cli(env, "mailbox", "update", str(mailbox_id), "--no-push")
        assert services.eventually(
            lambda: services.cli(env, "mailbox", "list", "--json")[0]["watch"] == "off", 30)
        assert services.cli(env, "status", "--json")["watches"] == {"off": 1}


def test_an_oauth2_mailbox_is_watched_through_its_tokens_expiry_until_its_grant_is_revoked(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
) -> None:
    env = {**env, **PUSH_ENV}
    user, owner = "alice@example.test", "owner@example.com"
    with (FakeProvider(access_lifetime=2.0) as idp,
          Dovecot(tmp_path / "dovecot", oauth2_introspection_url=f"{idp.url}/introspect") as server,
          TcpProxy(server.host, server.port) as proxy):
        server.add_user(user, "unused-password")
        services.cli(env, "user", "add", "--email", owner)
        services.cli(env, "oauth", "provider", "add", "--name", "fake", "--kind", "generic",
                     "--client-id", idp.client_id, "--token-url", f"{idp.url}/token")
        mailbox_id = int(services.cli(
            env, "mailbox", "add", "--owner", owner, "--auth", "oauth2", "--oauth-provider",
            "fake", "--host", proxy.host, "--port", str(proxy.port), "--security", "none",
            "--username", user, "--refresh-token-stdin",
            stdin=idp.grant(user).encode() + b"\n")["id"])
        processes.env.update(env)
        for service in ("scheduler", "fetcher", "persister", "notifier"):
            processes.start(service)
        _first_sync_done(env, mailbox_id)
        _watched(env, mailbox_id)
        uid = server.append(user, None, "INBOX", b"Subject: pushed\r\n\r\nover OAuth2\r\n")
        assert uid
        _stored(env, mailbox_id, "INBOX", uid)

        # The watch's token expires under it; the server then drops the session: the watch
        # logs in again with a refreshed token, and new mail still comes by push.
        time.sleep(2.1)
        refreshed, accepted = idp.requests["refresh_token"], proxy.accepted
        proxy.cut()
        assert services.eventually(
            lambda: idp.requests["refresh_token"] > refreshed and proxy.accepted > accepted
            and _watch(env, mailbox_id).get("state") == "watching", 30)
        uid = server.append(user, None, "INBOX", b"Subject: later\r\n\r\nnew token\r\n")
        assert uid
        _stored(env, mailbox_id, "INBOX", uid)
        asked = [r["requested_by"] for r in sql(
            env["MAILFERRY_DATABASE_URL"],
            "SELECT requested_by FROM sync_runs WHERE mailbox_id = %s", (mailbox_id,))]
        assert asked.count("push") >= 2 and not _told(env, owner)

        # Revoked: the watch's next refresh is refused, and the owner is told, once.
        idp.revoke(user)
        time.sleep(2.1)
        proxy.cut()
        assert services.eventually(lambda: _told(env, owner), 30) == ["credentials_invalid"]
        listed = services.cli(env, "mailbox", "list", "--json")[0]
        assert listed["credentials_invalid"] and listed["watch"] == "off"
        assert _told(env, owner) == ["credentials_invalid"]
        processes.assert_running()


def _told(env: dict[str, str], owner: str) -> list[str]:
    return [n["kind"] for n in services.cli(env, "notifications", "list", "--user", owner,
                                            "--json")]
