"""The notifier's work: credential events -> a notification for each person who can fix it.

Recipients: the owner of a personal mailbox; for a system mailbox (no owner), every enabled user
holding the ``imap_sync_origin_credential_notifications`` capability. Nobody else. This issue
delivers the "at next login" channel (stored until read); real-time and email come next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from shared.db import Connection
from shared.domain import CREDENTIAL_CAPABILITY
from shared.messages import AnyMessage, CredentialsInvalid, CredentialsRestored

log = structlog.get_logger(__name__)


@dataclass
class NotifierDeps:
    connection: Callable[[], Connection]


def recipients(conn: Connection, mailbox_id: int) -> list[dict[str, object]]:
    return conn.execute(
        """SELECT u.id, u.email, u.name FROM mailboxes m
             JOIN users u ON (m.owner_id IS NOT NULL AND u.id = m.owner_id)
                          OR (m.owner_id IS NULL AND %s = ANY(u.capabilities))
            WHERE m.id = %s AND u.enabled
            ORDER BY u.id""",
        (CREDENTIAL_CAPABILITY, mailbox_id),
    ).fetchall()


def handle(event: AnyMessage, deps: NotifierDeps) -> None:
    if not isinstance(event, CredentialsInvalid | CredentialsRestored):
        return
    conn = deps.connection()
    with conn.transaction():
        box = conn.execute("SELECT name, host, username FROM mailboxes WHERE id = %s",
                           (event.mailbox_id,)).fetchone()
        if box is None:
            log.info("notification.dropped", reason="mailbox no longer exists")
            return
        if isinstance(event, CredentialsInvalid):
            kind, key = "credentials_invalid", f"credentials-invalid:{event.detected_at.isoformat()}"
            title = f"Mailbox {box['name']}: the server refused its credentials"
            body = (f"Synchronization of {box['username']} on {box['host']} stopped: the server "
                    f"refused the login. Update the password or connection settings of this "
                    f"mailbox to resume it.")
        else:
            kind, key = "credentials_restored", f"credentials-restored:{event.restored_at.isoformat()}"
            title = f"Mailbox {box['name']}: synchronization works again"
            body = f"The server accepts the credentials of {box['username']} on {box['host']} again."
        users = recipients(conn, event.mailbox_id)
        for user in users:
            conn.execute(
                """INSERT INTO notifications (user_id, mailbox_id, kind, dedup_key, title, body)
                   VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                (user["id"], event.mailbox_id, kind, f"{event.mailbox_id}:{key}", title, body),
            )
    log.info("notification.stored", kind=kind, mailbox_id=event.mailbox_id,
             recipients=len(users))
