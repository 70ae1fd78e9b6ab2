"""The per-mailbox lease: one fetcher per mailbox at a time (DESIGN invariant 3).

Taking the lease increments ``mailboxes.lease_token``; that number is the fencing token every event
of the attempt carries, and the persister refuses events whose token is older than the current one.
A background thread renews the lease while the sync runs; when a renewal finds the token changed
(someone took over after our lease expired), the sync stops at its next check.

A sync cut into slices (``ContinueSync``) keeps one token for all its slices: the slice that stops
*hands the lease over* (no owner, but unexpired for another lease period, so no new attempt can
take it and fence off the events still in the queue), and the next slice *resumes* it, only if
the token is unchanged and nobody owns it. A slice that finds the token moved on (a newer attempt
started) takes a new lease as any attempt does; one that finds an owner waits (``LeaseHeld``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from mailferry import db
from mailferry.errors import LeaseHeld, LeaseLost

log = structlog.get_logger(__name__)


class Lease:
    def __init__(self, database_url: str, mailbox_id: int, token: int, seconds: float,
                 deadline: float | None = None) -> None:
        self.database_url = database_url
        # Renewed only until the attempt's deadline (time.monotonic()): an attempt stuck past it
        # lets its lease lapse, so another fetcher can take the mailbox over.
        self.deadline = deadline
        self.mailbox_id = mailbox_id
        self.token = token
        self.seconds = seconds
        self.handing_over = False  # set by a slice that stops: hand over instead of releasing
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)

    def check(self) -> None:
        """Raise LeaseLost if another fetcher owns the mailbox now: our events would be refused."""
        if self._lost.is_set():
            raise LeaseLost(f"lease on mailbox {self.mailbox_id} was taken over")

    def _renew_loop(self) -> None:
        conn: db.Connection | None = None
        while not self._stop.wait(self.seconds / 3):
            if self.deadline is not None and time.monotonic() > self.deadline:
                log.warning("lease.not_renewed", mailbox_id=self.mailbox_id,
                            reason="the attempt is past its deadline")
                break
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.database_url, autocommit=True)
                if not renew(conn, self.mailbox_id, self.token, self.seconds):
                    self._lost.set()
                    log.warning("lease.lost", mailbox_id=self.mailbox_id, lease_token=self.token)
                    return
            except Exception as exc:  # keep trying: the lease only lapses when it expires
                log.warning("lease.renew_failed", mailbox_id=self.mailbox_id, error=str(exc))
                conn = None
        if conn is not None:
            conn.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def acquire(conn: db.Connection, mailbox_id: int, owner: str, seconds: float) -> int:
    with conn.transaction():
        # Exclusive: waits for the persisters' transactions that read the old token (they hold
        # it shared), so none of the old attempt's writes can commit after this one starts.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (db.mailbox_lock_key(mailbox_id),))
        row = conn.execute(
            """UPDATE mailboxes
                  SET lease_token = lease_token + 1, lease_owner = %s,
                      lease_expires_at = now() + make_interval(secs => %s)
                WHERE id = %s AND (lease_expires_at IS NULL OR lease_expires_at < now())
            RETURNING lease_token""",
            (owner, seconds, mailbox_id),
        ).fetchone()
    if row is None:
        held = conn.execute(
            """SELECT lease_owner, extract(epoch FROM lease_expires_at - now()) AS remaining
                 FROM mailboxes WHERE id = %s""",
            (mailbox_id,),
        ).fetchone()
        remaining = float(held["remaining"]) if held and held["remaining"] is not None else 0.0
        owner_now = held["lease_owner"] if held else "?"
        raise LeaseHeld(f"mailbox {mailbox_id} is being synced by {owner_now} "
                        f"(lease expires in {remaining:.0f}s)")
    return int(row["lease_token"])


def renew(conn: db.Connection, mailbox_id: int, token: int, seconds: float) -> bool:
    row = conn.execute(
        """UPDATE mailboxes SET lease_expires_at = now() + make_interval(secs => %s)
            WHERE id = %s AND lease_token = %s RETURNING id""",
        (seconds, mailbox_id, token),
    ).fetchone()
    return row is not None


def resume(conn: db.Connection, mailbox_id: int, owner: str, seconds: float, token: int) -> bool:
    """Take over a lease handed over with ``token``; False when that cannot be done safely and a
    new lease must be taken: the token moved on (a newer attempt started), or a slice that held
    it let it expire without handing it over (it may be frozen, not dead: a new token fences it
    off). Raises ``LeaseHeld`` while another slice of the attempt holds it unexpired."""
    row = conn.execute(
        """UPDATE mailboxes SET lease_owner = %s,
                  lease_expires_at = now() + make_interval(secs => %s)
            WHERE id = %s AND lease_token = %s AND lease_owner IS NULL
        RETURNING lease_token""",
        (owner, seconds, mailbox_id, token),
    ).fetchone()
    if row is not None:
        return True
    held = conn.execute(
        """SELECT lease_token, lease_owner, lease_expires_at > now() AS live
             FROM mailboxes WHERE id = %s""", (mailbox_id,)).fetchone()
    if held is not None and held["lease_token"] == token and held["live"]:
        raise LeaseHeld(f"mailbox {mailbox_id} is being synced by {held['lease_owner']} "
                        "(a slice of the same attempt)")
    return False


def hand_over(conn: db.Connection, mailbox_id: int, token: int, seconds: float) -> bool:
    """Let the next slice resume this token: no owner, but unexpired for ``seconds``, so that no
    new attempt fences off the events already published meanwhile. False: the lease was lost."""
    row = conn.execute(
        """UPDATE mailboxes SET lease_owner = NULL,
                  lease_expires_at = now() + make_interval(secs => %s)
            WHERE id = %s AND lease_token = %s RETURNING id""",
        (seconds, mailbox_id, token),
    ).fetchone()
    return row is not None


def release(conn: db.Connection, mailbox_id: int, token: int) -> None:
    conn.execute(
        """UPDATE mailboxes SET lease_expires_at = NULL, lease_owner = NULL
            WHERE id = %s AND lease_token = %s""",
        (mailbox_id, token),
    )


@contextmanager
def held(database_url: str, conn: db.Connection, mailbox_id: int, owner: str,
         seconds: float, deadline: float | None = None,
         token: int | None = None) -> Iterator[Lease]:
    """The lease for one attempt (or one slice of it: ``token`` names a lease handed over,
    already resumed with :func:`resume`). On the way out it is released, or handed over when
    the slice set ``handing_over`` (and then ``handing_over`` is reset if the lease was lost)."""
    if token is None:
        token = acquire(conn, mailbox_id, owner, seconds)
    lease = Lease(database_url, mailbox_id, token, seconds, deadline)
    lease.start()
    try:
        yield lease
    finally:
        lease.stop()
        try:
            if lease.handing_over:
                if not hand_over(conn, mailbox_id, token, seconds):
                    lease.handing_over = False
                    log.warning("lease.lost", mailbox_id=mailbox_id, lease_token=token)
            else:
                release(conn, mailbox_id, token)
        except Exception as exc:
            # Releasing only lets the next fetcher start sooner; the lease expires anyway. A
            # connection lost here (PostgreSQL restarted, the backend terminated) must not turn
            # an attempt whose events are all published into a failure that is redone.
            log.warning("lease.release_failed", mailbox_id=mailbox_id, error=str(exc))
