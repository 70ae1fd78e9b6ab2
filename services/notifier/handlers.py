"""The notifier's work: credential events -> the people who can fix the mailbox, on three channels.

Recipients: the owner of a personal mailbox; for a system mailbox (no owner), every enabled user
holding the ``imap_sync_origin_credential_notifications`` capability. Nobody else, ever.

Once per transition: ``credential_alerts`` holds each mailbox's state, so a second refusal of the
same password tells nobody, and a reminder goes out on a timer (MAILFERRY_NOTIFY_REMINDER) while
it stays invalid. Each notification is stored for the recipient's next login, and gets one
delivery row per other channel (email, real time); deliveries are sent after the commit and a
channel that fails is retried later on its own, so a dead SMTP server neither blocks the real-time
push nor causes a second email once it is back. Rows are claimed with SKIP LOCKED, so several
notifiers never send the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from mailferry.db import Connection
from mailferry.domain import CREDENTIAL_CAPABILITY
from mailferry.errors import backoff
from mailferry.messages import CredentialsInvalid, CredentialsRestored
from mailferry.mime import clean_text

log = structlog.get_logger(__name__)

RETRY_MAX_SECONDS = 3600.0


@dataclass
class NotifierDeps:
    connection: Callable[[], Connection]
    reminder_seconds: float
    retry_base_seconds: float = 30.0
    send_email: Callable[[str, str, str], None] | None = None  # (to, subject, body)
    send_realtime: Callable[[int, dict[str, Any]], None] | None = None  # (user id, payload)

    @property
    def channels(self) -> list[str]:
        return [name for name, sender in (("email", self.send_email),
                                          ("realtime", self.send_realtime)) if sender]


def recipients(conn: Connection, mailbox_id: int) -> list[dict[str, Any]]:
    return conn.execute(
        """SELECT u.id, u.email, u.name FROM mailboxes m
             JOIN users u ON (m.owner_id IS NOT NULL AND u.id = m.owner_id)
                          OR (m.owner_id IS NULL AND %s = ANY(u.capabilities))
            WHERE m.id = %s AND u.enabled
            ORDER BY u.id""",
        (CREDENTIAL_CAPABILITY, mailbox_id),
    ).fetchall()


def handle(event: CredentialsInvalid | CredentialsRestored, deps: NotifierDeps) -> None:
    """Tell people once per transition: invalid (owner, or capability holders for a system
    mailbox) and restored; reminders and channel retries follow from :func:`tick`."""
    structlog.contextvars.bind_contextvars(type=event.type, mailbox_id=event.mailbox_id)
    conn = deps.connection()
    with conn.transaction():
        alert = conn.execute(
            "SELECT state FROM credential_alerts WHERE mailbox_id = %s FOR UPDATE",
            (event.mailbox_id,),
        ).fetchone()
        state = alert["state"] if alert else "ok"
        if isinstance(event, CredentialsInvalid):
            if state == "invalid":
                log.info("notification.skipped", reason="already told; reminders follow")
                return
            conn.execute(
                """INSERT INTO credential_alerts (mailbox_id, state, error, changed_at, notified_at)
                   VALUES (%s, 'invalid', %s, %s, now())
                   ON CONFLICT (mailbox_id) DO UPDATE
                      SET state = 'invalid', error = EXCLUDED.error, changed_at = EXCLUDED.changed_at,
                          notified_at = now(), reminders = 0""",
                (event.mailbox_id, clean_text(event.error), event.detected_at),
            )
            sent = _notify(conn, deps, event.mailbox_id, "credentials_invalid",
                           event.detected_at, event.error)
        else:
            if state != "invalid":
                log.info("notification.skipped", reason="credentials were not known to be invalid")
                return
            conn.execute(
                """UPDATE credential_alerts SET state = 'ok', changed_at = %s
                    WHERE mailbox_id = %s""",
                (event.restored_at, event.mailbox_id),
            )
            sent = _notify(conn, deps, event.mailbox_id, "credentials_restored",
                           event.restored_at, None)
    log.info("notification.stored", recipients=sent)
    deliver_pending(deps)


def tick(deps: NotifierDeps) -> None:
    """Reminders for mailboxes still invalid, then deliveries due for a retry."""
    conn = deps.connection()
    with conn.transaction():
        due = conn.execute(
            """SELECT mailbox_id, error, reminders FROM credential_alerts
                WHERE state = 'invalid' AND notified_at < now() - make_interval(secs => %s)
                FOR UPDATE SKIP LOCKED""",
            (deps.reminder_seconds,),
        ).fetchall()
        for alert in due:
            conn.execute(
                """UPDATE credential_alerts SET notified_at = now(), reminders = reminders + 1
                    WHERE mailbox_id = %s""",
                (alert["mailbox_id"],),
            )
            _notify(conn, deps, alert["mailbox_id"], "credentials_reminder",
                    None, alert["error"], reminder=alert["reminders"] + 1)
    if due:
        log.info("notification.reminders", mailboxes=len(due))
    deliver_pending(deps)


def _notify(conn: Connection, deps: NotifierDeps, mailbox_id: int, kind: str,
            at: datetime | None, error: str | None, reminder: int = 0) -> int:
    box = conn.execute(
        "SELECT id, name, host, port, username, auth_kind FROM mailboxes WHERE id = %s",
        (mailbox_id,)
    ).fetchone()
    if box is None:
        return 0
    title, body = compose(kind, box, error)
    key = f"{mailbox_id}:{kind}:{at.isoformat() if at else reminder}"
    people = recipients(conn, mailbox_id)
    for user in people:
        row = conn.execute(
            """INSERT INTO notifications (user_id, mailbox_id, kind, dedup_key, title, body)
               VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id""",
            (user["id"], mailbox_id, kind, key, title, body),
        ).fetchone()
        if row is None:
            continue  # the same fact told twice (a redelivered event)
        for channel in deps.channels:
            conn.execute(
                """INSERT INTO notification_deliveries (notification_id, channel)
                   VALUES (%s, %s)""",
                (row["id"], channel),
            )
    return len(people)


def compose(kind: str, box: dict[str, Any], error: str | None) -> tuple[str, str]:
    """Title and text: which mailbox, which server and user name, what went wrong, what to do.
    Nothing secret: the password is never known here."""
    where = f"{box['username']} on {box['host']}:{box['port']}"
    if kind == "credentials_restored":
        return (f"Mailbox {box['name']} syncs again",
                f"The server accepts the credentials of mailbox {box['name']} ({where}) again; "
                f"its synchronization has resumed. Nothing to do.")
    title = f"Mailbox {box['name']} cannot sync, the server refuses its credentials"
    if kind == "credentials_reminder":
        title = f"Reminder, {title[0].lower()}{title[1:]}"
    if box.get("auth_kind", "password") != "password":
        return title.replace("the server refuses its credentials",
                             "its OAuth2 authorization was refused"), clean_text(
            f"Synchronization of mailbox {box['name']} ({where}) has stopped: its OAuth2 "
            f"authorization was refused (revoked, expired, or the account's password changed)."
            f"\n\nWhat was said: {error or 'authorization refused'}\n\n"
            f"What to do: authorize mailferry again, e.g. `mailferry oauth authorize --provider "
            f"PROVIDER --owner EMAIL`, or give a new refresh token with `mailferry mailbox update "
            f"{box['id']} --refresh-token-stdin`. The mailbox is synced again as soon as it is "
            f"re-authorized.")
    body = (
        f"Synchronization of mailbox {box['name']} ({where}) has stopped: the IMAP server refused "
        f"the login.\n\nWhat the server said: {error or 'login refused'}\n\n"
        f"What to do: update the password (or the user name, host, port or security) in the "
        f"mailbox's settings, e.g. `mailferry mailbox update {box['id']} --password-stdin`. "
        f"The mailbox is synced again as soon as its settings change. If the password is right, "
        f"the account may be locked or need an app password: check with the mail provider."
    )
    return title, clean_text(body)


def deliver_pending(deps: NotifierDeps, limit: int = 100) -> int:
    """Send due deliveries, each on its own: a failure is recorded with a back-off, the rest go on."""
    conn = deps.connection()
    sent = 0
    while True:
        with conn.transaction():
            row = conn.execute(
                """SELECT d.id, d.channel, d.attempts, n.id AS notification_id, n.kind, n.title,
                          n.body, n.mailbox_id, n.created_at, u.id AS user_id, u.email
                     FROM notification_deliveries d
                     JOIN notifications n ON n.id = d.notification_id
                     JOIN users u ON u.id = n.user_id
                    WHERE d.status = 'pending' AND d.next_attempt_at <= now()
                    ORDER BY d.next_attempt_at
                    LIMIT 1 FOR UPDATE OF d SKIP LOCKED"""
            ).fetchone()
            if row is None or sent >= limit:
                return sent
            try:
                _send(deps, row)
            except Exception as exc:
                delay = backoff(row["attempts"] + 1, deps.retry_base_seconds, RETRY_MAX_SECONDS,
                                jitter=0.0)
                conn.execute(
                    """UPDATE notification_deliveries
                          SET attempts = attempts + 1, last_error = %s,
                              next_attempt_at = now() + make_interval(secs => %s)
                        WHERE id = %s""",
                    (clean_text(f"{type(exc).__name__}: {exc}")[:1000], delay, row["id"]),
                )
                log.warning("notification.delivery_failed", channel=row["channel"],
                            notification_id=row["notification_id"], error=str(exc),
                            retry_in=delay)
                continue
            conn.execute(
                """UPDATE notification_deliveries SET status = 'sent', sent_at = now(),
                          attempts = attempts + 1, last_error = NULL
                    WHERE id = %s""",
                (row["id"],),
            )
            sent += 1
            log.info("notification.delivered", channel=row["channel"],
                     notification_id=row["notification_id"], user_id=row["user_id"])


def _send(deps: NotifierDeps, row: dict[str, Any]) -> None:
    if row["channel"] == "email":
        assert deps.send_email is not None
        deps.send_email(row["email"], row["title"], row["body"])
    else:
        assert deps.send_realtime is not None
        deps.send_realtime(row["user_id"], {
            "id": row["notification_id"], "kind": row["kind"], "mailbox_id": row["mailbox_id"],
            "title": row["title"], "body": row["body"], "created_at": row["created_at"],
        })


HANDLERS: dict[type, Callable[..., None]] = {
    CredentialsInvalid: handle,
    CredentialsRestored: handle,
}
