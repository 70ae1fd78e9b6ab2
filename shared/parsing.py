"""The parse step: fills the parsed columns of messages stored with their raw bytes only.

A first sync (or a re-scan) stores each message's raw bytes and folder placement and counts it
as synced, as mbsync counts a file; MIME parsing was about half of the persister's time on that
path (bench/README.md, issue 11). The subject, addresses, dates, bodies, attachments and parse
errors are filled here afterwards, by a thread of every persister (services/persister/
indexer.py), in batches, while its queue is quiet. New mail above a folder's checkpoint is
still parsed as it is stored (services/persister/handlers.py), so the change stream announces it
with its subject at once.

The work left is in the database (``parsed_at IS NULL``, migration 0020), so a persister that
dies mid-batch loses nothing: its transaction rolls back and the rows wait for the next batch,
of this persister or another. Several parse side by side: a batch skips the rows another one
holds. ``parse_message`` never raises; what it finds wrong is recorded in ``parse_errors``, as
when the persister parsed inline. Each batch announces what it parsed (MessageParsed, shared/
outbox.py) in its own transaction.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg.types.json import Jsonb

from mailferry import outbox
from mailferry.db import Connection
from mailferry.mime import ParsedMessage, clean_text, parse_message

log = structlog.get_logger(__name__)

BATCH = 200
#: raw bytes read into memory per batch (at least one message, however big)
BATCH_BYTES = 32 * 1024 * 1024

#: the parsed columns of ``messages``, in the order of :func:`columns`
COLUMNS = ("message_id", "subject", "from_addr", "to_addrs", "cc_addrs", "bcc_addrs", "sent_at",
           "in_reply_to", "refs", "importance", "body_text", "body_html", "attachments",
           "parse_errors")


def columns(p: ParsedMessage) -> tuple[Any, ...]:
    """A parsed message as the values of :data:`COLUMNS`."""
    return (p.message_id, p.subject, p.from_, p.to, p.cc, p.bcc, p.date, p.in_reply_to,
            p.references, p.importance, p.text_body, p.html_body,
            Jsonb([a.model_dump() for a in p.attachments]), p.parse_errors)


_CLAIM = """
SELECT m.id, m.mailbox_id, m.sha256, m.size FROM messages m
 WHERE m.parsed_at IS NULL AND (%(mailbox)s::bigint IS NULL OR m.mailbox_id = %(mailbox)s)
 ORDER BY m.mailbox_id, m.id LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
"""

_UPDATE = ("UPDATE messages SET " + ", ".join(f"{c} = %s" for c in COLUMNS)
           + ", parsed_at = now() WHERE id = %s")

# what PostgreSQL may refuse in parsed text (none is known: the parser bounds every field)
_NOT_STORABLE = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


def parse_pending(conn: Connection, *, mailbox_id: int | None = None, limit: int = BATCH) -> int:
    """Parse up to ``limit`` stored messages that are not parsed yet (of one mailbox, or of
    any), store their fields and announce them; returns how many. Rows another parse step holds
    are skipped, not waited for. Lock order: the messages' rows, then their mailboxes' rows
    (``outbox.append``), as a persister's event does."""
    with conn.transaction():
        claimed = conn.execute(_CLAIM, {"mailbox": mailbox_id, "limit": limit}).fetchall()
        chosen: list[dict[str, Any]] = []
        total = 0
        for row in claimed:  # the rest stays locked until commit, and waits for the next batch
            if chosen and total + row["size"] > BATCH_BYTES:
                break
            chosen.append(row)
            total += row["size"]
        if not chosen:
            return 0
        # binary: the bytes as they are (text would be hex, twice their size, in libpq first)
        raw = {bytes(r["sha256"]): r["data"] for r in conn.execute(
            "SELECT sha256, data FROM raw_messages WHERE sha256 = ANY(%s)",
            ([r["sha256"] for r in chosen],), binary=True).fetchall()}
        parsed = [(r, parse_message(raw[bytes(r["sha256"])])) for r in chosen]
        try:
            with conn.transaction(), conn.cursor() as cur:  # a savepoint
                cur.executemany(_UPDATE, [(*columns(p), r["id"]) for r, p in parsed])
        except _NOT_STORABLE:
            parsed = [(r, _store_one(conn, r["id"], p)) for r, p in parsed]
        by_mailbox: dict[int, list[dict[str, Any]]] = {}
        for r, p in parsed:
            by_mailbox.setdefault(r["mailbox_id"], []).append({
                "id": r["id"], "sha256": r["sha256"], "message_id": p.message_id,
                "subject": p.subject, "from_addr": p.from_, "sent_at": p.date,
                "parse_errors": p.parse_errors})
        for mailbox in sorted(by_mailbox):
            outbox.append(conn, mailbox, outbox.parsed(mailbox, by_mailbox[mailbox]))
    return len(parsed)


def _store_one(conn: Connection, message_id: int, p: ParsedMessage) -> ParsedMessage:
    """Store one message's fields; if PostgreSQL refuses them, only the refusal, as a parse
    error, so that the message never waits for a parse again."""
    try:
        with conn.transaction():
            conn.execute(_UPDATE, (*columns(p), message_id))
        return p
    except _NOT_STORABLE as exc:
        error = clean_text(f"parsed fields not storable: {exc.diag.message_primary}")
        log.warning("parse.not_storable", message_ref=message_id, error=error)
        p = ParsedMessage(parse_errors=[error])
        conn.execute(_UPDATE, (*columns(p), message_id))
        return p


def unparsed(conn: Connection, mailbox_id: int | None = None) -> int:
    """How many stored messages (of one mailbox, or of all) are not parsed yet."""
    row = conn.execute("SELECT count(*) AS n FROM messages WHERE parsed_at IS NULL "
                       "AND (%(m)s::bigint IS NULL OR mailbox_id = %(m)s)",
                       {"m": mailbox_id}).fetchone()
    return int(row["n"]) if row else 0
