"""Reads of users and mailboxes that several services share (the fetcher, the notifier, the CLI)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mailferry.crypto import PasswordBox
from mailferry.db import Connection
from mailferry.imap import ImapConfig, Limits, Security


@dataclass(frozen=True)
class Mailbox:
    id: int
    owner_id: int | None
    name: str
    host: str
    port: int
    security: Security
    username: str
    password_encrypted: bytes
    sync_enabled: bool
    first_sync_days: int | None
    initial_folders: list[str] | None
    credentials_invalid_at: datetime | None
    last_error_kind: str | None
    auth_kind: str = "password"  # or "oauth2", "oauth2-app" (mailferry.oauth)

    def imap_config(self, box: PasswordBox, *, timeout: float, ca_file: Path | None,
                    allow_private_networks: bool = False,
                    limits: Limits | None = None) -> ImapConfig:
        return ImapConfig(
            host=self.host,
            port=self.port,
            security=self.security,
            username=self.username,
            # An OAuth2 mailbox has no password: its authenticator brings an access token.
            password=box.decrypt(self.password_encrypted) if self.auth_kind == "password" else "",
            timeout=timeout,
            ca_file=ca_file,
            allow_private_networks=allow_private_networks,
            limits=limits,
        )


_MAILBOX_COLUMNS = """id, owner_id, name, host, port, security, username, password_encrypted,
    sync_enabled, first_sync_days, initial_folders, credentials_invalid_at, last_error_kind,
    auth_kind"""


def get_mailbox(conn: Connection, mailbox_id: int) -> Mailbox | None:
    """None also for a mailbox being removed: to the fetcher (which then skips its sync) and
    every other reader it is already gone."""
    row = conn.execute(
        f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE id = %s AND removing_at IS NULL",
        (mailbox_id,),
    ).fetchone()
    return Mailbox(**row) if row else None


@dataclass(frozen=True)
class FolderState:
    mailbox_id: int
    raw_name: str
    sync_enabled: bool
    uidvalidity: int | None
    last_uid: int
    highest_modseq: int | None
    backfill_below: int | None = None  # a first sync cut by the download budget: UIDs below
    # The folder as the last listing found it (a push run that skips the listing uses it).
    name: str = ""
    delimiter: str | None = None
    flags: tuple[str, ...] = ()
    type: str = "other"
    selectable: bool = True
    gone: bool = False  # deleted on the server, kept for its synced mail
    # Its row: what the fetcher reads of the folder's mail goes by it, so that a folder renamed
    # in this run (its row renamed by the persister meanwhile, or not yet) is read the same.
    id: int | None = None


def folder_states(conn: Connection, mailbox_id: int) -> dict[str, FolderState]:
    rows = conn.execute(
        """SELECT id, mailbox_id, raw_name, sync_enabled, uidvalidity, last_uid, highest_modseq,
                  backfill_below, name, delimiter, flags, type, selectable,
                  gone_at IS NOT NULL AS gone
           FROM folders WHERE mailbox_id = %s""",
        (mailbox_id,),
    ).fetchall()
    return {r["raw_name"]: FolderState(**{**r, "flags": tuple(r["flags"])}) for r in rows}


def messages_by_hash(conn: Connection, mailbox_id: int, hashes: Iterable[bytes]) -> dict[bytes, int]:
    """The mailbox's stored messages among these SHA-256s: hash -> ``messages.id``.

    One probe of the unique (mailbox_id, sha256) index per hash, whatever the planner believes:
    a plain ``mailbox_id = %s AND sha256 = ANY(%s)`` was planned as a scan of every message of
    the mailbox (a mailbox in its first sync is new to the table's statistics, so it looks
    small), which made a first sync quadratic (issue 11: 0.16 s per batch of 500 at the start
    of a 20,000-message sync, 0.63 s at its end)."""
    rows = conn.execute(
        """SELECT m.id, m.sha256 FROM unnest(%s::bytea[]) AS h(sha256),
                  LATERAL (SELECT id, sha256 FROM messages
                            WHERE mailbox_id = %s AND sha256 = h.sha256 LIMIT 1) AS m""",
        (list(hashes), mailbox_id),
    ).fetchall()
    return {bytes(r["sha256"]): int(r["id"]) for r in rows}


def live_flags(conn: Connection, state: FolderState, uidvalidity: int, low: int = 1,
               high: int | None = None) -> dict[int, frozenset[str]]:
    """Flags of a folder's stored, not expunged placements in ``low..high`` (at most up to its
    checkpoint), by UID: one window at a time, so memory does not grow with the folder."""
    top = state.last_uid if high is None else min(high, state.last_uid)
    rows = conn.execute(
        """SELECT mf.uid, mf.flags FROM message_folders mf
            WHERE mf.folder_id = %s AND mf.uidvalidity = %s
              AND mf.expunged_at IS NULL AND mf.uid BETWEEN %s AND %s""",
        (state.id, uidvalidity, low, top),
    ).fetchall()
    return {int(r["uid"]): frozenset(r["flags"]) for r in rows}


def newest_message_ids(conn: Connection, state: FolderState, count: int) -> list[str]:
    """The Message-IDs of a folder's newest stored, not expunged messages: what a folder renamed
    under a new UIDVALIDITY must still hold."""
    rows = conn.execute(
        """SELECT m.message_id FROM message_folders mf JOIN messages m ON m.id = mf.message_id
            WHERE mf.folder_id = %s AND mf.expunged_at IS NULL AND m.message_id IS NOT NULL
            ORDER BY mf.uidvalidity DESC, mf.uid DESC LIMIT %s""",
        (state.id, count),
    ).fetchall()
    return [r["message_id"] for r in rows]


def stored_by_identity(conn: Connection, state: FolderState, uidvalidity: int,
                       message_ids: list[str]) -> dict[tuple[str, int, datetime], str]:
    """The folder's stored messages of UIDVALIDITY ``uidvalidity`` among ``message_ids``, by
    (Message-ID, size, INTERNALDATE) -> hex SHA-256 of their bytes."""
    rows = conn.execute(
        """SELECT m.message_id, mf.size, mf.internal_date, m.sha256 FROM message_folders mf
             JOIN messages m ON m.id = mf.message_id
            WHERE mf.folder_id = %s AND mf.uidvalidity = %s
              AND m.message_id = ANY(%s) AND mf.internal_date IS NOT NULL""",
        (state.id, uidvalidity, message_ids),
    ).fetchall()
    return {(r["message_id"], int(r["size"]), r["internal_date"]): bytes(r["sha256"]).hex()
            for r in rows}
