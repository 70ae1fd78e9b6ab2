"""The scheduler's watches: which mailboxes this process watches, and what a change triggers.

:class:`Watchers` runs two threads beside the scheduler's tick:

- the **manager**, every ``MAILFERRY_PUSH_LEASE / 3`` seconds, in one database pass:
  renews this process's heartbeat (``push_schedulers``) and its watch leases
  (``mailbox_watches``: holder, expiry, fencing token), stops the watches it lost or that are no
  longer wanted (push off, sync disabled, credentials invalid, mailbox removed, folders or
  credentials changed: the latter two are restarted), gives back watches above its fair share
  (``ceil(watchable / live schedulers)``, so a scheduler that joins gets its part), claims free
  or expired ones up to that share and ``MAILFERRY_PUSH_MAX_CONNECTIONS``, and writes each
  watch's state. A dead scheduler's leases and heartbeat expire after one lease period; the next
  pass of the others takes its watches over.
- the **dispatcher**: changed folders, gathered per mailbox for ``MAILFERRY_PUSH_DEBOUNCE``
  seconds, become one SyncMailbox (``requested_by="push"``, ``folders`` = what changed) through
  :func:`mailferry.sync_requests.request_syncs`. When the mailbox already has a run queued or
  running, the folders wait and are asked for again once it ends (that run may have listed
  them before they changed): a burst costs at most one more run, never a queue of them.

A watch whose login is refused marks the mailbox's credentials invalid and publishes
``CredentialsInvalid``, as a sync does; the mailbox is not watched again until they are updated.
For an OAuth2 mailbox that is the provider refusing the grant (``invalid_grant``), or the
server refusing a freshly refreshed token; an expired token is refreshed and the watch logs in
again (:mod:`services.scheduler.watch`). Its watch thread borrows one of
``TOKEN_CONNECTIONS`` database connections for the length of a token request (a lock on the
token row, and a refresh when the cached token is near its end): a thousand watches logging in
at once hold a few connections, not a thousand.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import structlog

from mailferry import db, oauth, repository
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.errors import ConfigError, DatabaseUnavailable, MailferryError
from mailferry.imap.idle import Status
from mailferry.messages import AnyMessage, CredentialsInvalid
from mailferry.services.scheduler.watch import Watch
from mailferry.slots import ConnectionSlots
from mailferry.sync_requests import request_syncs

log = structlog.get_logger(__name__)

# Watch threads spend their life blocked in recv(): a small stack keeps thousands of them
# cheap (the default is 8 MiB of address space each). TLS, imaplib and the parser fit in it.
WATCH_STACK_BYTES = 512 * 1024
#: Database connections the watches of one process share for their OAuth2 token requests.
TOKEN_CONNECTIONS = 4


@dataclass(frozen=True)
class Watchable:
    mailbox_id: int
    fingerprint: str  # changes when the account settings or the enabled folders change
    folders: list[str]
    # What the store last synced of each folder, as STATUS values: a watch compares the
    # server's first STATUS with it, so mail that came while nobody watched is synced at once.
    stored: dict[str, Status]


def watchable(conn: db.Connection) -> dict[int, Watchable]:
    """Mailboxes to watch: sync and push on, credentials not known invalid, not being removed;
    with their enabled folders (INBOX alone before the first listing)."""
    rows = conn.execute(
        """SELECT m.id, m.host, m.port, m.security, m.username, m.password_encrypted, m.auth_kind,
                  COALESCE(json_agg(json_build_array(f.raw_name, f.uidvalidity, f.uidnext,
                                                     f.highest_modseq) ORDER BY f.raw_name)
                           FILTER (WHERE f.raw_name IS NOT NULL), '[]') AS folders
             FROM mailboxes m
             LEFT JOIN folders f ON f.mailbox_id = m.id AND f.sync_enabled AND f.selectable
            WHERE m.sync_enabled AND m.push AND m.credentials_invalid_at IS NULL
              AND m.removing_at IS NULL
            GROUP BY m.id ORDER BY m.id""").fetchall()
    out = {}
    for r in rows:
        stored: dict[str, Status] = {}
        for name, uidvalidity, uidnext, modseq in r["folders"]:
            values = {"UIDVALIDITY": uidvalidity, "UIDNEXT": uidnext, "HIGHESTMODSEQ": modseq}
            stored[name] = {k: int(v) for k, v in values.items() if v is not None}
        folders = sorted(stored) or ["INBOX"]
        # An OAuth2 mailbox's tokens are not in it: each login reads the token row anyway.
        # Whether the folders are known is: a watch started before the first listing asks for
        # every folder at each change, and is restarted to name them once they are listed.
        digest = hashlib.sha256(repr((r["host"], r["port"], r["security"], r["username"],
                                      r["auth_kind"], bytes(r["password_encrypted"] or b""),
                                      folders, bool(stored))).encode())
        out[r["id"]] = Watchable(r["id"], digest.hexdigest(), folders, stored)
    return out


def mark_credentials_invalid(conn: db.Connection, mailbox_id: int, error: str) -> bool:
    """As a sync's refused login does (``runs.fail``): True when this is news."""
    row = conn.execute(
        """UPDATE mailboxes SET credentials_invalid_at = COALESCE(credentials_invalid_at, now()),
                  last_error = %s, last_error_kind = 'auth'
            WHERE id = %s AND credentials_invalid_at IS NULL RETURNING id""",
        (error[:2000], mailbox_id)).fetchone()
    return row is not None


class Dispatcher:
    """Changed folders -> debounced SyncMailbox commands (see the module doc)."""

    def __init__(self, connection: db.Reconnecting,
                 publish: Callable[[AnyMessage], None], debounce: float) -> None:
        self._connection = connection
        self._publish = publish
        self._debounce = debounce
        # mailbox -> (folders, due at); None: every enabled folder
        self._pending: dict[int, tuple[set[str] | None, float]] = {}
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="push-dispatch", daemon=True)

    def changed(self, mailbox_id: int, folders: set[str] | None) -> None:
        """``folders`` changed (None: sync every enabled folder)."""
        with self._lock:
            held, due = self._pending.get(mailbox_id, (set(), time.monotonic() + self._debounce))
            self._pending[mailbox_id] = (_union(held, folders), due)
            self._lock.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(10)
        self._connection.close()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop:
                    now = time.monotonic()
                    due = [m for m, (_, at) in self._pending.items() if at <= now]
                    if due:
                        break
                    wake = min((at for _, at in self._pending.values()), default=now + 60)
                    self._lock.wait(wake - now)
                if self._stop:
                    return
                batch = {m: self._pending.pop(m)[0] for m in due}
            for mailbox_id, folders in batch.items():
                self._request(mailbox_id, folders)

    def _request(self, mailbox_id: int, folders: set[str] | None) -> None:
        try:
            requested = request_syncs(self._connection(), self._publish, [mailbox_id],
                                      requested_by="push",
                                      folders=None if folders is None else sorted(folders))
            queued = requested[0].queued
        except MailferryError as exc:
            log.warning("push.request_failed", mailbox_id=mailbox_id, error=str(exc))
            queued = False
        except Exception:
            log.exception("push.request_failed", mailbox_id=mailbox_id)
            queued = False
        if queued:
            log.info("push.sync_requested", mailbox_id=mailbox_id,
                     folders=None if folders is None else sorted(folders))
            return
        with self._lock:  # a run is active (or the broker is away): ask again in a moment
            held, _ = self._pending.get(mailbox_id, (set(), 0.0))
            self._pending[mailbox_id] = (_union(held, folders), time.monotonic() + 1.0)


def _union(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    return None if a is None or b is None else a | b


class TokenConnections:
    """A few autocommit connections lent to the watches' token sources, one call at a time
    (:data:`mailferry.oauth.LendConnection`); a caller waits while all are lent."""

    def __init__(self, url: str, size: int = TOKEN_CONNECTIONS) -> None:
        self._free: queue.Queue[db.Reconnecting] = queue.Queue()
        self._all = [db.Reconnecting(url) for _ in range(size)]
        for connection in self._all:
            self._free.put(connection)

    @contextmanager
    def __call__(self) -> Iterator[db.Connection]:
        connection = self._free.get()
        try:
            yield connection()
        except psycopg.OperationalError as exc:  # the database went away: the watch backs off
            raise DatabaseUnavailable(f"token store unavailable: {exc}") from exc
        finally:
            self._free.put(connection)

    def close(self) -> None:
        for connection in self._all:
            connection.close()


class Watchers:
    """This process's watches (see the module doc)."""

    def __init__(self, settings: Settings, holder: str, publish: Callable[[AnyMessage], None],
                 passwords: PasswordBox) -> None:
        self.settings = settings
        self.holder = holder
        self.publish = publish
        self.passwords = passwords
        self.watches: dict[int, Watch] = {}
        self._written: dict[int, tuple[str, str | None, str | None]] = {}
        self._seen: dict[int, dict[str, Status]] = {}  # released watches' last STATUS values
        self._connection = db.Reconnecting(settings.database_url)
        self.slots = ConnectionSlots(settings, holder, settings.push_lease)
        self._token_connections = TokenConnections(settings.database_url)
        self.dispatcher = Dispatcher(db.Reconnecting(settings.database_url), publish,
                                     settings.push_debounce)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="push-manager", daemon=True)

    def start(self) -> None:
        self.dispatcher.start()
        self._thread.start()

    def states(self) -> list[str]:
        """Each watch's state (watching, polling, backoff, off), for the metrics."""
        return [watch.state for watch in list(self.watches.values())]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for watch in self.watches.values():
            watch.stop()
        for watch in self.watches.values():
            watch.join(5)
        try:
            conn = self._connection()
            conn.execute("""UPDATE mailbox_watches SET holder = NULL, lease_expires_at = NULL,
                                   state = 'off', mode = NULL, changed_at = now()
                             WHERE holder = %s""", (self.holder,))
            conn.execute("DELETE FROM push_schedulers WHERE id = %s", (self.holder,))
        except Exception as exc:  # the leases expire anyway
            log.warning("push.release_failed", error=str(exc))
        self.watches.clear()
        self.dispatcher.stop()
        self.slots.close()
        self._connection.close()
        self._token_connections.close()

    def _run(self) -> None:
        period = self.settings.push_lease / 3
        renewed = time.monotonic()
        while not self._stop.is_set():
            try:
                self.pass_once()
                renewed = time.monotonic()
            except Exception as exc:  # the database is away: the leases lapse if it stays away
                log.warning("push.pass_failed", error=str(exc))
                if time.monotonic() - renewed > self.settings.push_lease and self.watches:
                    # Our leases have expired: others may watch these mailboxes by now, and
                    # two watches would double the connections. Give them all up.
                    log.warning("push.leases_lapsed", watches=len(self.watches))
                    for watch in self.watches.values():
                        watch.stop()
                    self.watches.clear()
                    self._written.clear()
            self._stop.wait(period)

    # --- one pass --------------------------------------------------------------------------

    def pass_once(self) -> None:
        conn = self._connection()
        lease = self.settings.push_lease
        conn.execute(
            """INSERT INTO push_schedulers (id, expires_at)
               VALUES (%s, now() + make_interval(secs => %s))
               ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at""",
            (self.holder, lease))
        conn.execute("DELETE FROM push_schedulers WHERE expires_at < now()")
        self._renew(conn, lease)
        self._report_auth_failures(conn)
        wanted = watchable(conn)
        for mailbox_id, watch in list(self.watches.items()):
            item = wanted.get(mailbox_id)
            if item is None or item.fingerprint != watch.fingerprint:
                self._release(conn, mailbox_id, "off")
        live = conn.execute("SELECT count(*) AS n FROM push_schedulers").fetchone()
        schedulers = max(1, int(live["n"]) if live else 1)
        target = min(self.settings.push_max_connections, math.ceil(len(wanted) / schedulers))
        for mailbox_id in sorted(self.watches, reverse=True)[:max(0, len(self.watches) - target)]:
            self._release(conn, mailbox_id, "off")  # rebalancing: another scheduler takes it
        if len(self.watches) < target:
            self._claim(conn, wanted, target - len(self.watches), lease)
        self._write_states(conn)
        self._seen.clear()  # a watch restarted for new settings was claimed again above

    def _renew(self, conn: db.Connection, lease: float) -> None:
        if not self.watches:
            return
        ids = list(self.watches)
        tokens = [self.watches[m].token for m in ids]
        rows = conn.execute(
            """UPDATE mailbox_watches w SET lease_expires_at = now() + make_interval(secs => %s)
                 FROM unnest(%s::bigint[], %s::bigint[]) AS h(mailbox_id, token)
                WHERE w.mailbox_id = h.mailbox_id AND w.token = h.token AND w.holder = %s
            RETURNING w.mailbox_id""",
            (lease, ids, tokens, self.holder)).fetchall()
        kept = {r["mailbox_id"] for r in rows}
        for mailbox_id in ids:
            if mailbox_id not in kept:  # fenced off: someone else holds it now
                log.warning("push.lease_lost", mailbox_id=mailbox_id)
                self.watches.pop(mailbox_id).stop()
                self._written.pop(mailbox_id, None)

    def _report_auth_failures(self, conn: db.Connection) -> None:
        for mailbox_id, watch in list(self.watches.items()):
            if watch.auth_error is None:
                continue
            if mark_credentials_invalid(conn, mailbox_id, watch.auth_error):
                self.publish(CredentialsInvalid(mailbox_id=mailbox_id, error=watch.auth_error,
                                                detected_at=datetime.now(UTC)))
            self._release(conn, mailbox_id, "off", watch.auth_error)

    def _release(self, conn: db.Connection, mailbox_id: int, state: str,
                 error: str | None = None) -> None:
        watch = self.watches.pop(mailbox_id)
        watch.stop()
        self._seen[mailbox_id] = watch.known
        self._written.pop(mailbox_id, None)
        conn.execute(
            """UPDATE mailbox_watches SET holder = NULL, lease_expires_at = NULL, state = %s,
                      mode = NULL, error = %s, changed_at = now()
                WHERE mailbox_id = %s AND token = %s""",
            (state, error, mailbox_id, watch.token))

    def _claim(self, conn: db.Connection, wanted: dict[int, Watchable], count: int,
               lease: float) -> None:
        ids = [m for m in wanted if m not in self.watches]
        if not ids:
            return
        conn.execute("""INSERT INTO mailbox_watches (mailbox_id)
                        SELECT unnest(%s::bigint[]) ON CONFLICT DO NOTHING""", (ids,))
        rows = conn.execute(
            """UPDATE mailbox_watches w
                  SET token = w.token + 1, holder = %s, state = 'backoff', mode = NULL,
                      error = NULL, changed_at = now(),
                      lease_expires_at = now() + make_interval(secs => %s)
                WHERE w.mailbox_id IN (
                      SELECT mailbox_id FROM mailbox_watches
                       WHERE mailbox_id = ANY(%s)
                         AND (lease_expires_at IS NULL OR lease_expires_at < now())
                       ORDER BY mailbox_id LIMIT %s FOR UPDATE SKIP LOCKED)
            RETURNING w.mailbox_id, w.token""",
            (self.holder, lease, ids, count)).fetchall()
        threading.stack_size(WATCH_STACK_BYTES)
        try:
            for row in rows:
                self._start_watch(conn, wanted[row["mailbox_id"]], int(row["token"]))
        finally:
            threading.stack_size(0)

    def _start_watch(self, conn: db.Connection, item: Watchable, token: int) -> None:
        s = self.settings
        mailbox = repository.get_mailbox(conn, item.mailbox_id)
        if mailbox is None:
            return
        try:
            config = mailbox.imap_config(self.passwords, timeout=s.imap_timeout,
                                         ca_file=s.imap_ca_file,
                                         allow_private_networks=s.allow_private_networks,
                                         limits=s.imap_limits())
        except ConfigError as exc:  # a password the keys cannot read: the schedule reports it
            log.warning("push.not_watched", mailbox_id=item.mailbox_id, error=str(exc))
            return
        # OAuth2: the fetcher's token life cycle, on a connection lent for each request.
        auth = oauth.authenticator(mailbox, self._token_connections, self.passwords,
                                   timeout=s.imap_timeout)
        # Before its first listing a mailbox's folders are not known: a change syncs them all.
        on_change: Callable[[int, set[str]], None] = (
            self.dispatcher.changed if item.stored
            else lambda mailbox_id, _folders: self.dispatcher.changed(mailbox_id, None))
        watch = Watch(item.mailbox_id, token, config, item.folders, on_change,
                      poll=s.push_poll, renew=s.push_idle_renew, backoff_max=s.push_backoff_max,
                      fingerprint=item.fingerprint, slots=self.slots, authenticator=auth)
        # The store's last sync, then what this process last saw (a restart after a change of
        # folders or credentials): the first STATUS of the new connection is compared to them.
        watch.known.update({name: dict(values) for name, values in item.stored.items()})
        watch.known.update(self._seen.pop(item.mailbox_id, {}))
        self.watches[item.mailbox_id] = watch
        watch.start()
        log.info("push.watch_claimed", mailbox_id=item.mailbox_id, lease_token=token)

    def _write_states(self, conn: db.Connection) -> None:
        for mailbox_id, watch in self.watches.items():
            now = (watch.state, watch.mode, watch.error)
            if self._written.get(mailbox_id) == now:
                continue
            conn.execute(
                """UPDATE mailbox_watches SET state = %s, mode = %s, error = %s,
                          changed_at = now()
                    WHERE mailbox_id = %s AND token = %s""",
                (watch.state, watch.mode, watch.error and watch.error[:2000], mailbox_id,
                 watch.token))
            self._written[mailbox_id] = now
