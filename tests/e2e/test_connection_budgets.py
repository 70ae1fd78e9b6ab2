"""Connection budgets across the deployment, with every sync completing and nothing reported as
credentials invalid:

- a Dovecot allowing two connections per user and IP (``mail_max_userip_connections = 2``),
  one account registered as four mailboxes, watched by push and synced by two fetcher processes
  of four threads each, with an account budget of two: at most two connections are ever open;
- six accounts on one host with a host budget of two (``MAILFERRY_MAX_CONNECTIONS_PER_HOST``),
  synced at once by the same eight threads: at most two connections to the host are open."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from mailferry import app, db
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot

PASSWORD = "secret"
MAILBOXES = 4


class SlotWatcher:
    """Samples the slots in use (of the account ``alice``, or of any account when ``account``
    is None) every few milliseconds; ``peak``: the most seen."""

    def __init__(self, database_url: str, account: str | None = "alice") -> None:
        self.peak = 0
        self._url = database_url
        self._account = account
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with db.connect(self._url, autocommit=True) as conn:
            while not self._stop.wait(0.005):
                row = conn.execute("""SELECT count(*) AS n FROM imap_connection_slots
                                       WHERE (account = %s OR %s::text IS NULL)
                                         AND expires_at > now()""",
                                   (self._account, self._account)).fetchone()
                self.peak = max(self.peak, int(row["n"]) if row else 0)

    def __enter__(self) -> SlotWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_watched_account_synced_by_many_threads_stays_within_two_connections_never_invalid(
    env: dict[str, str], conn: db.Connection, tmp_path: Path,
) -> None:
    env = {**env, "MAILFERRY_PUSH": "1", "MAILFERRY_SYNC_INTERVAL": "3600",
           "MAILFERRY_PUSH_LEASE": "3", "MAILFERRY_PUSH_POLL": "1",
           "MAILFERRY_PUSH_DEBOUNCE": "0.2", "MAILFERRY_PUSH_BACKOFF_MAX": "1",
           "MAILFERRY_MAX_CONNECTIONS_PER_ACCOUNT": "2", "MAILFERRY_FETCHER_CONCURRENCY": "4",
           # Dovecot may count a connection a moment after its logout: a refusal then is a
           # short back-off (throttled), never a failure of the mailbox for good.
           "MAILFERRY_THROTTLE_BACKOFF": "1"}
    processes = services.ServiceProcesses(env, tmp_path)
    with Dovecot(tmp_path / "dovecot", max_connections_per_user=2) as server:
        server.add_user("alice", PASSWORD)
        with server.session("alice") as imap:
            for i in range(40):
                imap.append("INBOX", f"Subject: {i}\r\n\r\n{'x' * 2000}\r\n".encode())
        box = PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"]))
        app.add_user(conn, "owner@example.com")
        for i in range(MAILBOXES):
            app.add_mailbox(conn, box, owner_email="owner@example.com", host=server.host,
                            port=server.port, security="none", username="alice",
                            password=PASSWORD, name=f"alice {i}", folders=["INBOX"])
        try:
            with SlotWatcher(env["MAILFERRY_DATABASE_URL"]) as slots:
                processes.start("scheduler")
                processes.start("fetcher", count=2)
                processes.start("persister")

                def synced() -> bool:  # the scheduler's first sync of every mailbox
                    return len(conn.execute(
                        """SELECT DISTINCT mailbox_id FROM sync_runs
                            WHERE status = 'done'""").fetchall()) == MAILBOXES
                assert services.eventually(synced, timeout=180), processes.logs()
                # Then all four at once again, by hand: they queue for the account's slots.
                asked = [r["run_id"] for r in services.cli(env, "sync", "--all", "--json")]

                def all_finished() -> list[dict[str, Any]] | None:
                    rows = conn.execute("SELECT status, error_kind FROM sync_runs "
                                        "WHERE id = ANY(%s::uuid[])", (asked,)).fetchall()
                    active = any(r["status"] in ("queued", "running") for r in rows)
                    return None if active else rows
                finished = services.eventually(all_finished, timeout=180)

                def one_watch() -> list[dict[str, Any]] | None:
                    listed = services.cli(env, "mailbox", "list", "--json")
                    watching = [m for m in listed if m["watch"] == "watching"]
                    waiting = [m for m in listed if m["watch"] == "backoff"
                               and "no connection slot free" in (m["watch_error"] or "")]
                    return watching if len(watching) == 1 and len(waiting) == 3 else None
                watching = services.eventually(one_watch, timeout=60)
                assert watching, ("one watch; the other three wait, leaving the last slot to "
                                  f"the syncs: {services.cli(env, 'mailbox', 'list', '--json')}")

                uid = server.append("alice", None, "INBOX", b"Subject: pushed\r\n\r\nnew\r\n")
                pushed = services.eventually(lambda: conn.execute(
                    """SELECT 1 FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
                        WHERE f.mailbox_id = %s AND mf.uid = %s""",
                    (watching[0]["id"], uid)).fetchone(), timeout=30)
                listed = services.cli(env, "mailbox", "list", "--json")
                status = services.cli(env, "status", "--json")
            processes.assert_running()
            logs = processes.logs()
        finally:
            processes.stop()
        refusals = (server.log_file.read_text(errors="replace")
                    .count("Maximum number of connections"))

    # Every run completed, but for a refusal of Dovecot's (it may count a connection a moment
    # after its logout): that one is a back-off, as throttled.
    assert finished and all(r["status"] == "done" or r["error_kind"] == "throttled"
                            for r in finished), finished
    assert 1 <= slots.peak <= 2, f"{slots.peak} connections of alice open at once"
    assert pushed, "the watched mailbox got the new mail by push"
    assert not any(m["credentials_invalid"] for m in listed)
    assert status["mailboxes_with_invalid_credentials"] == 0
    assert conn.execute("SELECT count(*) AS n FROM sync_runs WHERE error_kind = 'auth'"
                        ).fetchone() == {"n": 0}
    assert all(not depth for name, depth in status["queues"].items()
               if name.endswith(".dead-letter")), status["queues"]
    assert "sync.waiting_for_connection" in logs, "the syncs did contend for the slots"
    assert "CredentialsInvalid" not in logs
    # What Dovecot refused was a back-off: the runs it hit failed as throttled.
    throttled = conn.execute("SELECT count(*) AS n FROM sync_runs WHERE error_kind = 'throttled' "
                             "AND status = 'failed'").fetchone()
    assert throttled is not None and throttled["n"] <= refusals
    print(f"Dovecot refusals: {refusals}, runs throttled: {throttled['n']}, "
          f"peak slots: {slots.peak}")


def test_accounts_sharing_a_host_with_a_budget_stay_within_it_and_all_sync(
    env: dict[str, str], conn: db.Connection, tmp_path: Path,
) -> None:
    accounts = [f"user{i}" for i in range(6)]
    env = {**env, "MAILFERRY_MAX_CONNECTIONS_PER_HOST": "2",
           "MAILFERRY_FETCHER_CONCURRENCY": "4", "MAILFERRY_THROTTLE_BACKOFF": "1"}
    processes = services.ServiceProcesses(env, tmp_path)
    with Dovecot(tmp_path / "dovecot") as server:
        box = PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"]))
        app.add_user(conn, "owner@example.com")
        for name in accounts:
            server.add_user(name, PASSWORD)
            with server.session(name) as imap:
                for i in range(10):
                    imap.append("INBOX", f"Subject: {name} {i}\r\n\r\n{'x' * 2000}\r\n".encode())
            app.add_mailbox(conn, box, owner_email="owner@example.com", host=server.host,
                            port=server.port, security="none", username=name,
                            password=PASSWORD, name=name, folders=["INBOX"])
        try:
            processes.start("fetcher", count=2)
            processes.start("persister")
            with SlotWatcher(env["MAILFERRY_DATABASE_URL"], account=None) as slots:
                runs = services.cli(env, "sync", "--all", "--wait", "--timeout", "180", "--json")
            processes.assert_running()
            logs = processes.logs()
        finally:
            processes.stop()

    assert [r["status"] for r in runs] == ["done"] * len(accounts), runs
    assert sum(r["messages_stored"] for r in runs) == 10 * len(accounts)
    assert 1 <= slots.peak <= 2, f"{slots.peak} connections to the host open at once"
    assert "sync.waiting_for_connection" in logs, "the syncs did contend for the host's slots"
    assert conn.execute("SELECT count(*) AS n FROM imap_connection_slots").fetchone() == {"n": 0}
