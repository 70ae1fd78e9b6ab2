"""The run state machine (shared/runs.py) on a real PostgreSQL: each transition, and what it
refuses."""

from __future__ import annotations

from datetime import UTC, datetime

from mailferry import db, runs
from mailferry.devkit import services
from mailferry.errors import ErrorKind
from mailferry.runs import RunKind, RunStatus

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _queued(conn: db.Connection, mailbox_id: int) -> runs.Run:
    run_id = runs.request(conn, mailbox_id, kind=RunKind.MAILBOX, force=False,
                          requested_by="test")
    assert run_id is not None
    run = runs.get(conn, run_id)
    assert run is not None
    return run


def test_a_mailbox_has_at_most_one_active_run(conn: db.Connection) -> None:
    mailbox = services.mailbox_row(conn)
    first = _queued(conn, mailbox)
    assert runs.request(conn, mailbox, kind=RunKind.FOLDERS, force=False,
                        requested_by="cli") is None
    assert runs.active(conn, mailbox) == first
    assert first.status == RunStatus.QUEUED


def test_a_run_starts_lists_announces_and_finishes_done_proving_the_credentials(
    conn: db.Connection,
) -> None:
    mailbox = services.mailbox_row(conn)
    conn.execute("UPDATE mailboxes SET credentials_invalid_at = now() WHERE id = %s", (mailbox,))
    run = _queued(conn, mailbox)
    run = runs.record(conn, run, runs.Progress(started_at=NOW, token=3))
    assert (run.status, run.lease_token) == (RunStatus.RUNNING, 3)
    run = runs.record(conn, run, runs.Progress(folders_listed=True, messages_stored=5))
    run = runs.record(conn, run, runs.Progress(folders_expected=2, token=3))
    assert (run.folders_listed, run.folders_expected) == (True, 2)
    assert runs.finish(conn, run, None) == RunStatus.DONE
    row = conn.execute("SELECT last_sync_status, credentials_invalid_at FROM mailboxes "
                       "WHERE id = %s", (mailbox,)).fetchone()
    assert row == {"last_sync_status": "done", "credentials_invalid_at": None}
    stored = conn.execute("SELECT messages_stored, status FROM sync_runs WHERE id = %s",
                          (run.id,)).fetchone()
    assert stored == {"messages_stored": 5, "status": "done"}


def test_a_refused_login_fails_the_run_and_marks_the_credentials_invalid(
    conn: db.Connection,
) -> None:
    mailbox = services.mailbox_row(conn)
    run = _queued(conn, mailbox)
    runs.fail(conn, run.id, mailbox, ErrorKind.AUTH, "login refused", NOW)
    failed = runs.get(conn, run.id)
    assert failed is not None and failed.status == RunStatus.FAILED
    row = conn.execute("SELECT last_error_kind, credentials_invalid_at FROM mailboxes "
                       "WHERE id = %s", (mailbox,)).fetchone()
    assert row == {"last_error_kind": "auth", "credentials_invalid_at": NOW}


def test_a_closed_run_is_never_reopened_or_closed_again(conn: db.Connection) -> None:
    mailbox = services.mailbox_row(conn)
    run = _queued(conn, mailbox)
    runs.give_up(conn, run.id, mailbox, "retries exhausted")
    runs.record(conn, run, runs.Progress(started_at=NOW, token=9))
    runs.fail(conn, run.id, mailbox, ErrorKind.TIMEOUT, "late", NOW)
    row = conn.execute("SELECT status, error_kind, error FROM sync_runs WHERE id = %s",
                       (run.id,)).fetchone()
    assert row == {"status": "failed", "error_kind": "internal", "error": "retries exhausted"}


def test_giving_up_on_a_run_of_another_mailbox_changes_nothing(conn: db.Connection) -> None:
    alice, bob = services.mailbox_row(conn), services.mailbox_row(conn)
    run = _queued(conn, bob)
    runs.give_up(conn, run.id, alice, "forged")
    still = runs.get(conn, run.id)
    assert still is not None and still.status == RunStatus.QUEUED


def test_a_run_left_active_past_the_timeout_expires(conn: db.Connection) -> None:
    mailbox = services.mailbox_row(conn)
    run = _queued(conn, mailbox)
    assert runs.expire(conn, 3600) == 0
    assert runs.expire(conn, 0) == 1
    expired = runs.get(conn, run.id)
    assert expired is not None and expired.status == RunStatus.EXPIRED


def test_progress_counts_only_the_attempt_that_planned(conn: db.Connection) -> None:
    mailbox = services.mailbox_row(conn)
    run = _queued(conn, mailbox)
    runs.planned(conn, run.id, 4, folders=3)
    runs.found(conn, run.id, 4, 10)
    runs.found(conn, run.id, 3, 99)  # an older attempt's count is ignored
    row = conn.execute("SELECT folders_total, messages_found FROM sync_runs WHERE id = %s",
                       (run.id,)).fetchone()
    assert row == {"folders_total": 3, "messages_found": 10}
