"""The persister's SQL: idempotent writes keyed by what identifies each fact.

Every function runs inside the caller's transaction. Rows that several workers may insert at once
are inserted in a stable order (sorted by key) so two transactions cannot deadlock on each other.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from mailferry import mime, outbox, parsing, repository, runs
from mailferry.db import Connection, mailbox_lock_key
from mailferry.domain import enabled_on_discovery
from mailferry.imap import decode_folder_name
from mailferry.messages import FetchedMessage, FlagChange, FolderInfo, FolderSelection, FolderSynced
from mailferry.mime import ParsedMessage, clean_text


def current_token(conn: Connection, mailbox_id: int) -> int | None:
    """The mailbox's fencing token, read under a shared lock held until the transaction ends:
    a fetcher taking the lease over waits for the writes in flight (``lease.acquire`` takes the
    lock exclusively), so no write of an older attempt can land after the newer one began."""
    conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (mailbox_lock_key(mailbox_id),))
    row = conn.execute("SELECT lease_token FROM mailboxes WHERE id = %s", (mailbox_id,)).fetchone()
    return None if row is None else int(row["lease_token"])


def initial_folders(conn: Connection, mailbox_id: int) -> list[str] | None:
    row = conn.execute("SELECT initial_folders FROM mailboxes WHERE id = %s",
                       (mailbox_id,)).fetchone()
    return None if row is None else row["initial_folders"]


# --- runs -------------------------------------------------------------------------------------


def settle(conn: Connection, mailbox_id: int, run_id: uuid.UUID, token: int,
           progress: runs.Progress) -> str | None:
    """Record an event's progress on its run, then close what is complete: folders whose
    announced batches are all stored (their checkpoint moves), then the run once every folder
    is closed. Returns the run's final status, if reached.

    Folders close only once the run's listing is stored: before it, a folder new to the store
    has no row to take its checkpoint (an empty folder's FolderSynced announces no batch, so
    it can be stored first), and a renamed one still has its old name.

    The caller holds the run row's lock since the start of its transaction (the order of
    ``shared.runs``), so what is read here includes every earlier event of the run; then the
    folders to close (by id), then (when it finishes) the mailbox.
    """
    run = runs.lock(conn, run_id)  # held already: this only reads it
    if run is None:
        return None
    run = runs.record(conn, run, progress)
    if not run.active or run.lease_token != token or not run.folders_listed:
        return None
    pending = conn.execute(
        """SELECT f.folder, f.uidvalidity, f.batches, f.last_uid, f.uidnext, f.highest_modseq,
                  f.error, f.backfill_below,
                  (SELECT count(*) FROM sync_batches b
                    WHERE b.run_id = f.run_id AND b.lease_token = f.lease_token
                      AND b.folder = f.folder) AS stored
             FROM sync_folders f
            WHERE f.run_id = %s AND f.lease_token = %s AND NOT f.completed
              AND f.batches IS NOT NULL""",
        (run_id, token),
    ).fetchall()
    closing = [f for f in pending if f["stored"] >= f["batches"]]
    if closing:
        conn.execute(
            """SELECT id FROM folders WHERE mailbox_id = %s AND raw_name = ANY(%s)
                ORDER BY id FOR UPDATE""",
            (mailbox_id, [f["folder"] for f in closing]),
        )
    for f in closing:
        _advance_folder(conn, run.mailbox_id, f)
    if closing:
        conn.execute(
            """UPDATE sync_folders SET completed = true
                WHERE run_id = %s AND lease_token = %s AND folder = ANY(%s)""",
            (run_id, token, [f["folder"] for f in closing]),
        )
    if run.folders_expected is None:
        return None
    done = conn.execute(
        """SELECT count(*) AS n, count(error) AS failed,
                  string_agg(folder || ': ' || error, '; ' ORDER BY folder) AS errors
             FROM sync_folders WHERE run_id = %s AND lease_token = %s AND completed""",
        (run_id, token),
    ).fetchone()
    assert done is not None
    if done["n"] < run.folders_expected:
        return None
    error = (f"{done['failed']} of {done['n']} folders failed: {done['errors']}"
             if done["failed"] else None)
    return runs.finish(conn, run, error)


def _advance_folder(conn: Connection, mailbox_id: int, f: dict[str, Any]) -> None:
    if f["error"] is not None or f["uidvalidity"] is None or f["last_uid"] is None:
        conn.execute(
            "UPDATE folders SET last_error = %s WHERE mailbox_id = %s AND raw_name = %s",
            (f["error"], mailbox_id, f["folder"]),
        )
        return
    # A new UIDVALIDITY means the old UIDs name nothing any more (RFC 3501 2.3.1.1): their
    # placements become tombstones. The messages and raw bytes stay, so mail that comes back
    # under new UIDs is not stored twice.
    reset = conn.execute(
        """UPDATE message_folders mf SET expunged_at = now()
             FROM folders f
            WHERE f.id = mf.folder_id AND f.mailbox_id = %s AND f.raw_name = %s
              AND mf.uidvalidity <> %s AND mf.expunged_at IS NULL
        RETURNING mf.folder_id, f.name AS folder, mf.uidvalidity, mf.uid, mf.message_id""",
        (mailbox_id, f["folder"], f["uidvalidity"]),
    ).fetchall()
    outbox.append(conn, mailbox_id, outbox.expunged_by_reset(mailbox_id, reset))
    # Checkpoints only move forward within one UIDVALIDITY; a new UIDVALIDITY starts over.
    conn.execute(
        """UPDATE folders
              SET last_uid = CASE WHEN uidvalidity IS DISTINCT FROM %(uv)s THEN %(last)s
                                  ELSE GREATEST(last_uid, %(last)s) END,
                  highest_modseq = CASE WHEN uidvalidity IS DISTINCT FROM %(uv)s THEN %(hms)s
                                        ELSE GREATEST(highest_modseq, %(hms)s) END,
                  uidnext = CASE WHEN uidvalidity IS DISTINCT FROM %(uv)s THEN %(next)s
                                 ELSE GREATEST(uidnext, %(next)s) END,
                  uidvalidity = %(uv)s, last_synced_at = now(), last_error = NULL,
                  backfill_below = %(backfill)s
            WHERE mailbox_id = %(mb)s AND raw_name = %(folder)s""",
        {"uv": f["uidvalidity"], "last": f["last_uid"], "hms": f["highest_modseq"],
         "next": f["uidnext"], "mb": mailbox_id, "folder": f["folder"],
         "backfill": f["backfill_below"]},
    )


def folder_synced(conn: Connection, e: FolderSynced) -> None:
    conn.execute(
        """INSERT INTO sync_folders (run_id, lease_token, folder, uidvalidity, batches, last_uid,
                                     uidnext, highest_modseq, messages, error, backfill_below)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (run_id, lease_token, folder) DO NOTHING""",
        (e.run_id, e.lease_token, e.folder, e.uidvalidity, e.batches, e.last_uid, e.uidnext,
         e.highest_modseq, e.messages, clean_text(e.error) if e.error else None,
         e.backfill_below),
    )


# --- folders ----------------------------------------------------------------------------------


def upsert_folders(conn: Connection, mailbox_id: int, folders: Sequence[FolderInfo],
                   initial: list[str] | None, first_listing: bool,
                   selection: Sequence[FolderSelection] | None = None) -> dict[str, int]:
    """Store the server's folder list; apply the deletion rule to folders no longer listed.

    A folder gone from the server is deleted only if it holds no synced mail (tombstones of
    expunged mail do not count); one that does is kept and marked gone (OroCRM's rule), so
    deleting a folder never deletes a user's synced mail. What became of the selection (names
    resolved or unmatched, enabled folders vanished) is recorded on the mailbox.
    """
    rows = sorted(folders, key=lambda f: f.raw_name)
    listed = [f.raw_name for f in rows]
    renamed = 0
    # A renamed folder's row takes the new name and keeps its settings, checkpoint and mail.
    # (The --folders selection names folders; a name left by a rename is reported as matching
    # nothing, as any other.) Renames are recognised by the fetcher: by
    # UIDVALIDITY, which most servers keep on RENAME (RFC 3501 6.3.5), or by content (Courier
    # gives a new one; the next sync finds the messages again without downloading them).
    old_names = {r["uidvalidity"]: r["raw_name"] for r in conn.execute(
        """SELECT raw_name, uidvalidity FROM folders
            WHERE mailbox_id = %s AND NOT (raw_name = ANY(%s)) AND uidvalidity IS NOT NULL""",
        (mailbox_id, listed)).fetchall()}
    for f in rows:
        old = f.renamed_from or (old_names.get(f.uidvalidity) if f.uidvalidity else None)
        if old is None or old in listed:
            continue
        renamed += len(conn.execute(
            """UPDATE folders SET raw_name = %s, name = %s, gone_at = NULL
                WHERE mailbox_id = %s AND raw_name = %s
                  AND NOT EXISTS (SELECT 1 FROM folders WHERE mailbox_id = %s AND raw_name = %s)
            RETURNING id""",
            (f.raw_name, clean_text(f.name), mailbox_id, old, mailbox_id, f.raw_name),
        ).fetchall())
    # One round trip for the whole listing (executemany pipelines); a folder that did not
    # change is not written again (most listings: no dead row, no WAL).
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO folders AS f (mailbox_id, name, raw_name, delimiter, flags, type,
                                         selectable, sync_enabled)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (mailbox_id, raw_name) DO UPDATE
                  SET name = EXCLUDED.name, delimiter = EXCLUDED.delimiter,
                      flags = EXCLUDED.flags, type = EXCLUDED.type,
                      selectable = EXCLUDED.selectable, gone_at = NULL
                WHERE (f.name, f.delimiter, f.flags, f.type, f.selectable, f.gone_at)
                      IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.delimiter, EXCLUDED.flags,
                                        EXCLUDED.type, EXCLUDED.selectable, NULL)""",
            [(mailbox_id, clean_text(f.name), f.raw_name, f.delimiter, list(f.flags), f.type,
              f.selectable, enabled_on_discovery(f, initial, first_listing, selection))
             for f in rows],
        )
    gone_rows = conn.execute(
        """SELECT name, raw_name FROM folders WHERE mailbox_id = %s AND sync_enabled
              AND NOT (raw_name = ANY(%s)) ORDER BY name""", (mailbox_id, listed)).fetchall()
    vanished = [r["name"] for r in gone_rows]
    gone_names = {n.casefold() for r in gone_rows for n in (r["name"], r["raw_name"])}
    conn.execute(
        """UPDATE folders f SET gone_at = now()
            WHERE f.mailbox_id = %s AND f.gone_at IS NULL AND NOT (f.raw_name = ANY(%s))
              AND EXISTS (SELECT 1 FROM message_folders mf
                           WHERE mf.folder_id = f.id AND mf.expunged_at IS NULL)""",
        (mailbox_id, listed),
    )
    deleted = conn.execute(
        """DELETE FROM folders f
            WHERE f.mailbox_id = %s AND NOT (f.raw_name = ANY(%s))
              AND NOT EXISTS (SELECT 1 FROM message_folders mf
                               WHERE mf.folder_id = f.id AND mf.expunged_at IS NULL)
        RETURNING id""",
        (mailbox_id, listed),
    ).fetchall()
    # A selected folder that vanished is reported once, as vanished.
    unmatched = [s.name for s in selection or ()
                 if s.raw_name is None and s.name.casefold() not in gone_names]
    report = {
        "selection": [s.model_dump() for s in selection] if selection is not None else None,
        "unmatched": unmatched,
        "vanished": vanished,
    }
    conn.execute("""UPDATE mailboxes SET folder_report = %s WHERE id = %s
                     AND folder_report IS DISTINCT FROM %s""",
                 (Jsonb(report), mailbox_id, Jsonb(report)))
    return {"listed": len(listed), "renamed": renamed, "deleted": len(deleted),
            "unmatched": len(unmatched), "vanished": len(vanished)}


def waits_for_listing(conn: Connection, run: runs.Run | None, mailbox_id: int,
                      raw_name: str) -> bool:
    """Whether a batch of a folder waits for its run's listing: the folder is not in the store
    (new, or renamed in this run: its row still has the old name) and the listing (stored by
    another thread or persister, events arrive in any order) is not. So the change stream
    announces a folder, with its type, before its mail, and a renamed folder's mail goes to its
    renamed row. A run that is no longer active waits for nothing (its listing may never
    come)."""
    return (run is not None and run.active and not run.folders_listed
            and conn.execute("SELECT 1 FROM folders WHERE mailbox_id = %s AND raw_name = %s",
                             (mailbox_id, raw_name)).fetchone() is None)


def folder_id(conn: Connection, mailbox_id: int, raw_name: str) -> int:
    """The folder's id; a placeholder row if the store has none (a batch that no longer waits
    for its run's listing, see :func:`waits_for_listing`), which a listing then completes."""
    name, _ = decode_folder_name(raw_name.encode("utf-8", "surrogateescape"))
    row = conn.execute(
        """INSERT INTO folders (mailbox_id, name, raw_name, sync_enabled)
           VALUES (%s, %s, %s, true)
           ON CONFLICT (mailbox_id, raw_name) DO UPDATE SET raw_name = EXCLUDED.raw_name
        RETURNING id""",
        (mailbox_id, clean_text(name), raw_name),
    ).fetchone()
    assert row is not None
    return int(row["id"])


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    fetched: FetchedMessage
    sha256: bytes | None
    new: bool  # bytes this mailbox does not hold yet: stored with this event
    parsed: ParsedMessage | None  # None: stored unparsed, for the parse step (shared/parsing.py)


def sha256(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def checkpoint_uid(conn: Connection, mailbox_id: int, raw_name: str,
                   uidvalidity: int) -> int | None:
    """The folder's last stored UID under ``uidvalidity``; None when it has no checkpoint under
    it yet (a first sync, a UIDVALIDITY reset): every UID there is backfill."""
    row = conn.execute(
        """SELECT last_uid FROM folders
            WHERE mailbox_id = %s AND raw_name = %s AND uidvalidity = %s""",
        (mailbox_id, raw_name, uidvalidity)).fetchone()
    return None if row is None or row["last_uid"] is None else int(row["last_uid"])


def known_hashes(conn: Connection, mailbox_id: int, hashes: list[bytes]) -> set[bytes]:
    return set(repository.messages_by_hash(conn, mailbox_id, hashes))


def store_messages(conn: Connection, mailbox_id: int, folder: int, uidvalidity: int,
                   batch: Sequence[Incoming], token: int) -> int:
    """Insert the batch's raw bytes (once per hash), messages (once per mailbox and hash:
    parsed, or left for the parse step with ``parsed_at`` NULL) and folder placements (once per
    UIDVALIDITY and UID; an expunged UID's tombstone wins).

    A placement already stored by an older attempt (a fetcher that crashed or stalled after
    some of its batches were stored) takes this attempt's flags: they were read from the server
    later. Without that, the newer attempt's insert was a no-op and the older flags stayed
    until the next run's flag pass."""
    with_raw = sorted({m.sha256: m for m in batch if m.sha256 is not None and m.new}.values(),
                      key=lambda m: m.sha256 or b"")
    with conn.cursor() as cur:
        small = [m for m in with_raw if len(m.fetched.raw or b"") < COPY_RAW_FROM]
        big = [m for m in with_raw if len(m.fetched.raw or b"") >= COPY_RAW_FROM]
        if small:
            cur.executemany(
                """INSERT INTO raw_messages (sha256, size, data) VALUES (%b, %s, %b)
                   ON CONFLICT (sha256) DO NOTHING""",
                [(m.sha256, len(m.fetched.raw or b""), m.fetched.raw) for m in small],
            )
        if big:
            _insert_big_raw(cur, big)
        parsed = [m for m in with_raw if m.parsed is not None]
        unparsed = [m for m in with_raw if m.parsed is None]
        if parsed:
            cur.executemany(
                f"""INSERT INTO messages (mailbox_id, sha256, size, {", ".join(parsing.COLUMNS)},
                                         parsed_at)
                   VALUES (%s, %b, %s, {", ".join(["%s"] * len(parsing.COLUMNS))}, now())
                   ON CONFLICT (mailbox_id, sha256) DO NOTHING""",
                [(mailbox_id, m.sha256, len(m.fetched.raw or b""), *parsing.columns(m.parsed))
                 for m in parsed if m.parsed is not None],
            )
        if unparsed:  # one statement for the batch: the parsed columns keep their defaults
            # ... but the Message-ID, from the header alone: a folder renamed with a new
            # UIDVALIDITY is recognised, and its mail reused, by it (fetcher/planning.py).
            cur.execute(
                """INSERT INTO messages (mailbox_id, sha256, size, message_id)
                   SELECT %s, u.sha256, u.size, u.message_id
                     FROM unnest(%s::bytea[], %s::bigint[], %s::text[])
                          AS u(sha256, size, message_id)
                   ON CONFLICT (mailbox_id, sha256) DO NOTHING""",
                (mailbox_id, [m.sha256 for m in unparsed],
                 [len(m.fetched.raw or b"") for m in unparsed],
                 [mime.message_id_of(m.fetched.raw or b"") for m in unparsed]),
            )
        hashes = [m.sha256 for m in batch if m.sha256 is not None]
        ids = repository.messages_by_hash(conn, mailbox_id, hashes)
        placements = sorted(batch, key=lambda m: m.fetched.uid)
        cur.executemany(
            """INSERT INTO message_folders (folder_id, uidvalidity, uid, message_id, flags, seen,
                                            modseq, internal_date, size, skipped_reason,
                                            flags_token)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (folder_id, uidvalidity, uid) DO UPDATE
                  SET flags = EXCLUDED.flags, seen = EXCLUDED.seen,
                      modseq = COALESCE(EXCLUDED.modseq, message_folders.modseq),
                      flags_token = EXCLUDED.flags_token
                WHERE message_folders.expunged_at IS NULL
                  AND COALESCE(message_folders.flags_token, 0) < EXCLUDED.flags_token""",
            [
                (folder, uidvalidity, m.fetched.uid,
                 ids.get(m.sha256) if m.sha256 else None,
                 [clean_text(f) for f in m.fetched.flags], "\\Seen" in m.fetched.flags,
                 m.fetched.modseq, m.fetched.internal_date, m.fetched.size,
                 m.fetched.skipped_reason, token)
                for m in placements
            ],
        )
    return len(batch)


def apply_flags(conn: Connection, folder: int, uidvalidity: int, changes: Sequence[FlagChange],
                token: int) -> None:
    """New flags win only over flags read by the same or an older attempt, and never touch a
    tombstone: duplicated or late events cannot roll flags back."""
    with conn.cursor() as cur:
        cur.executemany(
            """UPDATE message_folders
                  SET flags = %s, seen = %s, modseq = COALESCE(%s, modseq), flags_token = %s
                WHERE folder_id = %s AND uidvalidity = %s AND uid = %s AND expunged_at IS NULL
                  AND COALESCE(flags_token, 0) <= %s
                  AND (flags IS DISTINCT FROM %s OR modseq IS DISTINCT FROM COALESCE(%s, modseq))""",
            [(flags, "\\Seen" in flags, c.modseq, token, folder, uidvalidity, c.uid, token,
              flags, c.modseq)
             for c in sorted(changes, key=lambda c: c.uid)
             for flags in [[clean_text(f) for f in c.flags]]],
        )


def expunge(conn: Connection, folder: int, uidvalidity: int, uids: Sequence[int]) -> None:
    """Tombstones: the UID is never used again within this UIDVALIDITY (RFC 3501 2.3.1.1), so a
    late insert of it must not bring the message back."""
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO message_folders (folder_id, uidvalidity, uid, expunged_at)
               VALUES (%s, %s, %s, now())
               ON CONFLICT (folder_id, uidvalidity, uid) DO UPDATE
                  SET expunged_at = COALESCE(message_folders.expunged_at, now())""",
            [(folder, uidvalidity, uid) for uid in sorted(uids)],
        )


#: Raw messages from this size on are streamed with COPY rather than sent as a parameter.
COPY_RAW_FROM = 1024 * 1024
#: COPY's binary format (PostgreSQL docs, "COPY", File Formats): signature, flags, extension.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)


def _insert_big_raw(cur: psycopg.Cursor[Any], batch: Sequence[Incoming]) -> None:
    """Insert big raw messages without copying them in the client.

    A bytea parameter goes whole into libpq's output buffer, which grows by doubling and is
    kept by the connection: an 80 MiB message left the persister 2x its size bigger for
    good. COPY takes the bytes in chunks straight from the message. It cannot say ON CONFLICT,
    so the rows land in a temporary table first (a second worker may store the same mail at
    the same time; the first insert wins, as with the parameter path)."""
    cur.execute("""CREATE TEMP TABLE IF NOT EXISTS raw_incoming
                       (sha256 bytea, size bigint, data bytea) ON COMMIT DELETE ROWS""")
    with cur.copy("COPY raw_incoming (sha256, size, data) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(_COPY_HEADER)
        for m in batch:
            raw, digest = m.fetched.raw or b"", m.sha256 or b""
            copy.write(struct.pack("!hi", 3, len(digest)) + digest
                       + struct.pack("!iqi", 8, len(raw), len(raw)))
            copy.write(memoryview(raw))  # psycopg sends it in slices of the same buffer
        copy.write(struct.pack("!h", -1))
    cur.execute("""INSERT INTO raw_messages (sha256, size, data)
                   SELECT sha256, size, data FROM raw_incoming ORDER BY sha256
                   ON CONFLICT (sha256) DO NOTHING""")
    cur.execute("TRUNCATE raw_incoming")


def batch_stored(conn: Connection, run_id: uuid.UUID, token: int, folder: str, batch_no: int,
                 count: int) -> bool:
    """Record a stored batch; False when it was stored before (a redelivery)."""
    row = conn.execute(
        """INSERT INTO sync_batches (run_id, lease_token, folder, batch_no, messages)
           VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING batch_no""",
        (run_id, token, folder, batch_no, count),
    ).fetchone()
    return row is not None
