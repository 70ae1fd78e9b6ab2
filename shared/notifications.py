"""Notifications waiting for a person's next login: what a host application calls at sign-in.

    from mailferry.notifications import pop_notifications
    for n in pop_notifications(conn, "alice@example.com"):
        flash(n.title, n.body)
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from mailferry.db import Connection


class Notification(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: int
    kind: str  # credentials_invalid | credentials_reminder | credentials_restored
    mailbox_id: int | None
    title: str
    body: str
    created_at: datetime
    read_at: datetime | None


_COLUMNS = "n.id, n.kind, n.mailbox_id, n.title, n.body, n.created_at, n.read_at"


def list_notifications(conn: Connection, email: str, *, unread_only: bool = True) -> list[Notification]:
    rows = conn.execute(
        f"""SELECT {_COLUMNS} FROM notifications n JOIN users u ON u.id = n.user_id
             WHERE lower(u.email) = lower(%s) AND (n.read_at IS NULL OR NOT %s)
             ORDER BY n.created_at, n.id""",
        (email, unread_only),
    ).fetchall()
    return [Notification(**r) for r in rows]


def pop_notifications(conn: Connection, email: str) -> list[Notification]:
    """The unread notifications of this person, marked read in the same statement (two logins at
    once cannot both get the same one)."""
    rows = conn.execute(
        f"""UPDATE notifications n SET read_at = now() FROM users u
             WHERE u.id = n.user_id AND lower(u.email) = lower(%s) AND n.read_at IS NULL
         RETURNING {_COLUMNS}""",
        (email,),
    ).fetchall()
    return sorted((Notification(**r) for r in rows), key=lambda n: (n.created_at, n.id))
