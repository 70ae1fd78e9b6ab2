"""What a fetcher does with a command it will not try again."""

from __future__ import annotations

from mailferry import db, runs
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.errors import ImapConnectionError, LeaseHeld
from mailferry.messages import SyncMailbox
from mailferry.services.fetcher.handlers import FetcherDeps, command_given_up


def _deps(settings: Settings, database_url: str) -> FetcherDeps:
    return FetcherDeps(settings=settings, connection=db.Reconnecting(database_url),
                       publish=lambda _: None, passwords=PasswordBox(settings.secret_key),
                       fetcher_id="test")


def _running_run(conn: db.Connection) -> SyncMailbox:
    mailbox_id = services.mailbox_row(conn)
    run_id = runs.request(conn, mailbox_id, kind=runs.RunKind.MAILBOX, force=False,
                          requested_by="test")
    assert run_id is not None
    return SyncMailbox(run_id=run_id, mailbox_id=mailbox_id)


def _status(conn: db.Connection, command: SyncMailbox) -> str:
    row = conn.execute("SELECT status FROM sync_runs WHERE id = %s", (command.run_id,)).fetchone()
    assert row is not None
    return str(row["status"])


def test_a_duplicate_that_kept_meeting_a_live_lease_leaves_the_run_to_its_holder(
    conn: db.Connection, settings: Settings, database_url: str,
) -> None:
    command = _running_run(conn)
    command_given_up(command, LeaseHeld("mailbox is being synced by fetcher-2"),
                     _deps(settings, database_url))
    assert _status(conn, command) == "queued"


def test_a_command_given_up_on_a_failing_server_fails_its_run_with_the_error_kind(
    conn: db.Connection, settings: Settings, database_url: str,
) -> None:
    command = _running_run(conn)
    command_given_up(command, ImapConnectionError("imap.example.com:993: connection refused"),
                     _deps(settings, database_url))
    assert _status(conn, command) == "failed"
    assert conn.execute("SELECT error_kind FROM sync_runs WHERE id = %s",
                        (command.run_id,)).fetchone() == {"error_kind": "connection"}
