"""One watched mailbox: a thread that holds its IMAP connection and reports changed folders.

The thread connects, runs a :class:`PushSession` (NOTIFY, IDLE or STATUS polling, see
``mailferry.imap.idle``) and hands every set of changed folders to ``on_change``. It never touches
the database or the broker: :mod:`services.scheduler.watchers` reads its ``state`` and
``auth_error`` and does the writing, for every watch of the process, in one pass.

A dropped connection is reconnected after a backoff that doubles up to ``backoff_max``, with full
jitter (so a server restart does not bring every watch back in the same second), and not before
the ``retry_after`` a throttled server or token endpoint asked for. A refused login ends the
thread with ``auth_error`` set: the credential-invalid path of a sync follows.

An OAuth2 mailbox's watch logs in with an access token from the token row (``mailferry.oauth``:
cached, refreshed under the row's lock). A watch outlives its token (about an hour): a server
that ends the session when the token expires (Microsoft: ``* BYE Session invalidated -
AccessTokenExpired``; or a plain drop, or NO to the next command) is logged in again at once with
a refreshed token, never reported as credentials invalid. Only the provider refusing the grant
(``invalid_grant``), or the server refusing a freshly refreshed token, is an ``auth_error``; the
provider unavailable (429, 5xx, no answer) is a backoff like a dropped connection.

Each connection first takes a slot of the account's connection budget (``shared/slots.py``), and
gives it back after logging out; when none is free (a watch leaves the last one to syncs), the
watch is in ``backoff`` and tries again later, exactly as after a dropped connection: meanwhile
the schedule syncs the mailbox. A server's "too many connections" is the same backoff, never
``auth_error``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from mailferry import oauth
from mailferry.errors import ImapAuthError, MailferryError, backoff
from mailferry.imap import Authenticator, ImapConfig, OAuth2Auth
from mailferry.imap.connection import ImapConnector
from mailferry.imap.idle import PushSession, Status
from mailferry.slots import ConnectionSlots, Purpose

log = structlog.get_logger(__name__)

#: Seconds between two immediate re-logins after "token expired" (a token lasts about an hour).
REAUTHENTICATE_EVERY = 60.0


class Watch:
    def __init__(self, mailbox_id: int, token: int, config: ImapConfig, folders: list[str],
                 on_change: Callable[[int, set[str]], None], *, poll: float, renew: float,
                 backoff_max: float, fingerprint: object = None,
                 slots: ConnectionSlots | None = None,
                 authenticator: Authenticator | None = None) -> None:
        self.mailbox_id = mailbox_id
        self.token = token
        self.config = config
        self.authenticator = authenticator  # None: the password of ``config``
        self.folders = folders
        self.fingerprint = fingerprint  # what the watch was started with (config, folders)
        self.on_change = on_change
        self.poll = poll
        self.renew = renew
        self.backoff_max = backoff_max
        self.slots = slots  # None: no connection budget (a watch outside a deployment)
        self.state = "backoff"  # until connected: watching, polling or backoff
        self.mode: str | None = None
        self.error: str | None = None
        self.auth_error: str | None = None
        self.known: dict[str, Status] = {}
        self._stop = threading.Event()
        self._session: PushSession | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{mailbox_id}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (it wakes from its wait at once); does not wait for it."""
        self._stop.set()
        session = self._session
        if session is not None:
            session.interrupt()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @contextmanager
    def _slot(self) -> Iterator[None]:
        if self.slots is None:
            yield
            return
        with self.slots.held(self.mailbox_id, self.config.host, self.config.username,
                             Purpose.WATCH):
            yield

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        structlog.contextvars.bind_contextvars(mailbox_id=self.mailbox_id)
        failures = 0
        reauthenticated = -math.inf
        while not self._stop.is_set():
            established = False
            try:
                with self._slot(), ImapConnector(self.config, self.authenticator) as connector:
                    connector.connect()
                    session = PushSession(connector, self.folders, self.known, poll=self.poll,
                                          renew=self.renew)
                    self._session = session
                    if self._stop.is_set():
                        return
                    changed = session.start()
                    established = True
                    self.mode = session.mode
                    self.state = "polling" if session.mode == "status" else "watching"
                    self.error = None
                    failures = 0
                    log.info("watch.established", mode=session.mode, folders=len(self.folders))
                    while not self._stop.is_set():
                        if changed:
                            self.on_change(self.mailbox_id, changed)
                        changed = session.next_changes()
                    session.stop()
            except ImapAuthError as exc:
                self.auth_error = str(exc)
                self.state = "off"
                log.warning("watch.auth_failed", error=str(exc))
                return
            except (MailferryError, OSError) as exc:  # the server, the budget, the database
                if self._stop.is_set():
                    return
                if (self._token_expired(exc) and established
                        and time.monotonic() - reauthenticated > REAUTHENTICATE_EVERY):
                    # The session outlived its OAuth2 token: log in again now, with a fresh
                    # one. Only after a session that worked, and once a minute at most, so a
                    # server that keeps saying so gets the backoff below, not a refresh loop.
                    reauthenticated = time.monotonic()
                    log.info("watch.reauthenticating", reason=str(exc))
                    continue
                failures += 1
                self.state = "backoff"
                self.error = str(exc)
                delay = backoff(failures + 1, 1.0, self.backoff_max, jitter=1.0)
                delay = max(delay, getattr(exc, "retry_after", None) or 0.0)
                log.info("watch.backoff", error=str(exc), seconds=round(delay, 2))
                self._stop.wait(delay)
            except Exception as exc:  # a bug must not end the watch silently and for good
                self.state = "backoff"
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("watch.crashed")
                self._stop.wait(self.backoff_max)
            finally:
                self._session = None

    def _token_expired(self, exc: Exception) -> bool:
        """Whether the server ended an OAuth2 session because its token expired; if so, the
        next login asks the token row for a fresh one (not the cached one it just refused)."""
        auth = self.authenticator
        if not isinstance(auth, OAuth2Auth) or not oauth.token_expired(exc):
            return False
        auth.token_expired()
        return True
