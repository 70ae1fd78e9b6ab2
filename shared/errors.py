"""One exception hierarchy for mailferry, split by what a consumer should do with the failure.

``TransientError``: the world may heal (a server down, a timeout); retry with backoff.
``PermanentError``: retrying cannot help (a malformed message, a refused login); dead-letter or
report it. Anything else is a bug: it is retried within the budget, then dead-lettered.
"""

from __future__ import annotations

import random
from enum import StrEnum


def backoff(failures: int, base: float, cap: float, *, jitter: float = 0.5) -> float:
    """Seconds to wait after ``failures`` failures in a row (1 or more): ``base`` doubling with
    each, at most ``cap``; the last ``jitter`` share of it random (0: none, 1: all), so that what
    failed together does not come back together. The one back-off rule of mailferry."""
    longest = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 30))
    return longest * (1.0 - jitter + random.random() * jitter)


class ErrorKind(StrEnum):
    """Why a run failed, as recorded with it and carried by SyncFailed."""

    AUTH = "auth"  # the server refused the credentials
    CONNECTION = "connection"  # refused, unreachable, dropped
    THROTTLED = "throttled"  # the provider limits us: [THROTTLED], [UNAVAILABLE], too many connections
    TLS = "tls"
    PROTOCOL = "protocol"  # a NO/BAD answer, or an answer beyond the limits
    TIMEOUT = "timeout"  # a deadline passed, or the run was never finished (expired)
    CONFIG = "config"  # the mailbox's settings cannot work (an internal address, bad values)
    BROKER = "broker"  # the command never reached RabbitMQ
    FOLDER = "folder"  # some folders failed, the others were synced
    INTERNAL = "internal"  # a message was given up on (retries exhausted, a bug)


class MailferryError(Exception):
    """Base of every error mailferry raises on purpose; its message is one clear line."""


class TransientError(MailferryError):
    """``retry_after``: the seconds the other side asked us to wait (an HTTP ``Retry-After``,
    Exchange's "Suggested Backoff Time"), or None. The worker's retry of a message that failed
    with it waits at least that long (up to its longest retry delay)."""

    retry_after: float | None = None


class Postponed(TransientError):
    """The work cannot start yet, through nobody's fault (a shared resource is busy): the
    worker puts the message back for at least ``retry_after`` seconds without spending one of
    its retries, so waiting never ends in a dead letter (a run that waits past
    MAILFERRY_RUN_TIMEOUT expires, and its command is then dropped)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoConnectionSlot(Postponed):
    """Every slot of the account's (or the host's) connection budget is held by other IMAP
    connections of the deployment (``shared/slots.py``)."""

    kind = ErrorKind.THROTTLED


class PermanentError(MailferryError):
    pass


class ConfigError(PermanentError):
    """The settings or the command line are wrong."""


class InvalidInput(ConfigError):
    """A value a person or a host application gave is refused (a malformed email address,
    host or port); the message names the value's field and what it must be."""


class NotFound(PermanentError):
    pass


class DatabaseUnavailable(TransientError):
    pass


class BrokerUnavailable(TransientError):
    pass


class ImapError(MailferryError):
    """Base of IMAP failures; ``kind`` is recorded with the sync run."""

    kind: ErrorKind = ErrorKind.PROTOCOL


class ImapConnectionError(ImapError, TransientError):
    """Refused, unreachable, timed out, or dropped."""

    kind = ErrorKind.CONNECTION


class ImapThrottled(ImapError, TransientError):
    """The provider limits this account now ([THROTTLED], [OVERQUOTA], [UNAVAILABLE], "too many
    simultaneous connections", a BYE with a rate-limit text): never a credentials problem. The
    fetcher backs the mailbox off (``mailboxes.throttled_until``) instead of retrying soon.
    ``retry_after``: the seconds the server suggested, when it said (Exchange does); the
    backoff is at least that long."""

    kind = ErrorKind.THROTTLED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ImapTlsError(ImapError, PermanentError):
    """The certificate did not verify, or STARTTLS was configured but not offered."""

    kind = ErrorKind.TLS


class ImapAddressRefused(ImapError, PermanentError):
    """The host resolves to an address mailferry may not connect to (internal networks)."""

    kind = ErrorKind.CONFIG


class ImapAuthError(ImapError, PermanentError):
    """The server refused the credentials: they are invalid until someone changes them."""

    kind = ErrorKind.AUTH


class ImapProtocolError(ImapError, TransientError):
    """The server answered NO/BAD to something other than the login."""

    kind = ErrorKind.PROTOCOL


class ImapTimeout(ImapError, TransientError):
    """A command's answer, or the whole sync attempt, did not complete within its deadline
    (however often bytes trickled in). The connection is closed: its state is unknown."""

    kind = ErrorKind.TIMEOUT


class ImapLimitExceeded(ImapError, PermanentError):
    """The server sent more than mailferry accepts for one line or one command (counted on the
    bytes received, not on what the server declared). The connection is closed."""

    kind = ErrorKind.PROTOCOL


class LeaseLost(TransientError):
    """Another fetcher took over the mailbox's lease: stop writing, the newer one owns it."""


class LeaseHeld(TransientError):
    """The mailbox is being synced by another fetcher whose lease has not expired yet."""
