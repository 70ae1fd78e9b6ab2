"""Removing what a person no longer wants synced: a mailbox, or a user and their mailboxes.

Two steps. First, in one transaction, the mailbox is marked as being removed and fenced off:
``removing_at`` is set (the scheduler, the fetcher and every reader then see it as gone), its
sync is disabled, its password is erased, and its fencing token is bumped under the mailbox's
advisory lock taken exclusively, as a fetcher taking the lease over does
(``services/fetcher/lease.py``). A sync in flight therefore loses its lease at its next renewal,
and the persister refuses every later event of it (``event.lease_token < current``); the lease is
held by "removal" until the row is gone, so no new attempt can start either.

Then the data goes in chunks, one transaction each, so that no lock is held long and a removal
interrupted anywhere (kill -9 included) leaves a consistent store that running the removal again
finishes: placements, messages (their search vectors are columns of theirs) with the raw bytes no
other mailbox's message references (in the same transaction, so none is orphaned), notifications,
folders, the runs' batch records, and last the mailbox row (its runs, their folder progress and
its credential alerts go with it, by ON DELETE CASCADE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailferry import db
from mailferry.app import validation as valid
from mailferry.errors import InvalidInput, NotFound

#: Rows deleted per transaction.
DEFAULT_BATCH = 1000
#: Who holds the lease of a mailbox being removed (``mailboxes.lease_owner``).
LEASE_OWNER = "mailferry removal"


def mailbox_summary(conn: db.Connection, mailbox_id: int) -> dict[str, Any]:
    """What removing the mailbox would delete (for a confirmation question)."""
    row = conn.execute(
        """SELECT m.id, m.name, u.email AS owner, m.removing_at,
                  (SELECT count(*) FROM messages g WHERE g.mailbox_id = m.id) AS messages,
                  (SELECT count(*) FROM folders f WHERE f.mailbox_id = m.id) AS folders
             FROM mailboxes m LEFT JOIN users u ON u.id = m.owner_id WHERE m.id = %s""",
        (mailbox_id,),
    ).fetchone() if valid.record_id(mailbox_id) else None
    if row is None:
        raise NotFound(f"no mailbox with id {mailbox_id}")
    return dict(row)


def user_summary(conn: db.Connection, email: str) -> dict[str, Any]:
    """The user and the mailboxes they own (system mailboxes are never among them)."""
    valid.text(email, "email")
    row = conn.execute("SELECT id, email FROM users WHERE lower(email) = lower(%s)",
                       (email,)).fetchone()
    if row is None:
        raise NotFound(f"no user with email {email}")
    mailboxes = conn.execute(
        """SELECT m.id, m.name, (SELECT count(*) FROM messages g WHERE g.mailbox_id = m.id)
                  AS messages
             FROM mailboxes m WHERE m.owner_id = %s ORDER BY m.id""",
        (row["id"],),
    ).fetchall()
    return {"id": row["id"], "email": row["email"], "mailboxes": mailboxes}


def remove_mailbox(conn: db.Connection, mailbox_id: int, *, batch: int = DEFAULT_BATCH,
                   on_chunk: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
    """Stop syncing the mailbox at once, then delete everything mailferry holds for it.

    Safe to repeat and to interrupt: a mailbox left half-removed is finished by calling this
    again. ``conn`` must be in autocommit mode (each chunk commits on its own). Returns what
    this call deleted, by kind; ``on_chunk`` sees the running totals after every chunk. Raises
    NotFound when there is no such mailbox (never was, or already removed)."""
    if batch < 1:
        raise InvalidInput("batch: must be at least 1")
    _fence(conn, mailbox_id)
    removed = {"mailbox_id": mailbox_id, "placements": 0, "messages": 0, "raw_messages": 0,
               "raw_bytes": 0, "notifications": 0, "folders": 0, "run_records": 0,
               "changes": 0}
    for step in (_placements, _messages, _notifications):
        while (n := step(conn, mailbox_id, batch, removed)) > 0:
            if on_chunk is not None:
                on_chunk(dict(removed))
            if n < batch:
                break
    with conn.transaction():
        removed["folders"] += conn.execute(
            "DELETE FROM folders WHERE mailbox_id = %s", (mailbox_id,)).rowcount
        # sync_batches has no foreign key to its run; read the runs, write only the batches
        removed["run_records"] += conn.execute(
            """DELETE FROM sync_batches WHERE run_id IN
                   (SELECT id FROM sync_runs WHERE mailbox_id = %s)""", (mailbox_id,)).rowcount
        # the change stream's rows name its mail (subjects, addresses): they go too
        removed["changes"] += conn.execute(
            "DELETE FROM change_outbox WHERE mailbox_id = %s", (mailbox_id,)).rowcount
        conn.execute("DELETE FROM mailboxes WHERE id = %s AND removing_at IS NOT NULL",
                     (mailbox_id,))
    return removed


def remove_user(conn: db.Connection, email: str, *, batch: int = DEFAULT_BATCH,
                on_chunk: Callable[[dict[str, int]], None] | None = None) -> dict[str, Any]:
    """Remove each of the user's mailboxes (as :func:`remove_mailbox`), then the user and
    their notifications. System mailboxes (no owner) stay. Safe to repeat and to interrupt."""
    user = user_summary(conn, email)
    removed: list[dict[str, int]] = []
    for _ in range(10):  # a mailbox added to the user meanwhile is removed on the next turn
        owned = [r["id"] for r in conn.execute(
            "SELECT id FROM mailboxes WHERE owner_id = %s ORDER BY id", (user["id"],)).fetchall()]
        for mailbox_id in owned:
            try:
                removed.append(remove_mailbox(conn, mailbox_id, batch=batch, on_chunk=on_chunk))
            except NotFound:
                continue  # removed by someone else meanwhile
        gone = conn.execute(
            """DELETE FROM users WHERE id = %s
                  AND NOT EXISTS (SELECT 1 FROM mailboxes WHERE owner_id = %s)""",
            (user["id"], user["id"])).rowcount
        if gone:
            break
    return {"user_id": user["id"], "email": user["email"], "mailboxes": removed}


def _fence(conn: db.Connection, mailbox_id: int) -> None:
    if not valid.record_id(mailbox_id):
        raise NotFound(f"no mailbox with id {mailbox_id}")
    with conn.transaction():
        # Exclusive, as lease.acquire takes it: waits for the persisters' transactions that
        # read the old token, so none of the old attempt's writes can commit after this one.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (db.mailbox_lock_key(mailbox_id),))
        row = conn.execute(
            """UPDATE mailboxes
                  SET removing_at = COALESCE(removing_at, now()), sync_enabled = false,
                      password_encrypted = '\\x'::bytea, updated_at = now(),
                      lease_token = lease_token + 1, lease_owner = %s,
                      lease_expires_at = 'infinity'
                WHERE id = %s RETURNING id""",
            (LEASE_OWNER, mailbox_id),
        ).fetchone()
    if row is None:
        raise NotFound(f"no mailbox with id {mailbox_id}")


def _placements(conn: db.Connection, mailbox_id: int, batch: int,
                removed: dict[str, int]) -> int:
    with conn.transaction():
        n = conn.execute(
            """DELETE FROM message_folders WHERE (folder_id, uidvalidity, uid) IN
                   (SELECT mf.folder_id, mf.uidvalidity, mf.uid FROM message_folders mf
                      JOIN folders f ON f.id = mf.folder_id
                     WHERE f.mailbox_id = %s LIMIT %s)""",
            (mailbox_id, batch)).rowcount
    removed["placements"] += n
    return n


def _messages(conn: db.Connection, mailbox_id: int, batch: int, removed: dict[str, int]) -> int:
    """A chunk of messages and, in the same transaction, the raw bytes that only they held
    (identical mail in another mailbox keeps its bytes: they are stored once per hash)."""
    with conn.transaction():
        hashes = [r["sha256"] for r in conn.execute(
            """DELETE FROM messages WHERE id IN
                   (SELECT id FROM messages WHERE mailbox_id = %s ORDER BY id LIMIT %s)
               RETURNING sha256""", (mailbox_id, batch)).fetchall()]
        if hashes:
            raw = conn.execute(
                """DELETE FROM raw_messages r WHERE r.sha256 = ANY(%s)
                      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.sha256 = r.sha256)
                   RETURNING size""", (sorted(set(hashes)),)).fetchall()
            removed["raw_messages"] += len(raw)
            removed["raw_bytes"] += sum(int(r["size"]) for r in raw)
    removed["messages"] += len(hashes)
    return len(hashes)


def _notifications(conn: db.Connection, mailbox_id: int, batch: int,
                   removed: dict[str, int]) -> int:
    with conn.transaction():
        n = conn.execute(
            """DELETE FROM notifications WHERE id IN
                   (SELECT id FROM notifications WHERE mailbox_id = %s LIMIT %s)""",
            (mailbox_id, batch)).rowcount
    removed["notifications"] += n
    return n
