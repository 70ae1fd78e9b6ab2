"""One exception hierarchy for mailferry, split by what a consumer should do with the failure.

``TransientError``: the world may heal (a server down, a timeout); retry with backoff.
``PermanentError``: retrying cannot help (a malformed message, a refused login); dead-letter or
report it. Anything else is a bug: it is retried within the budget, then dead-lettered.
"""

from __future__ import annotations


class MailferryError(Exception):
    """Base of every error mailferry raises on purpose; its message is one clear line."""


class TransientError(MailferryError):
    pass


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

    kind = "protocol"


class ImapConnectionError(ImapError, TransientError):
    """Refused, unreachable, timed out, dropped, or [UNAVAILABLE]."""

    kind = "connection"


class ImapTlsError(ImapError, PermanentError):
    """The certificate did not verify, or STARTTLS was configured but not offered."""

    kind = "tls"


class ImapAddressRefused(ImapError, PermanentError):
    """The host resolves to an address mailferry may not connect to (internal networks)."""

    kind = "config"


class ImapAuthError(ImapError, PermanentError):
    """The server refused the credentials: they are invalid until someone changes them."""

    kind = "auth"


class ImapProtocolError(ImapError, TransientError):
    """The server answered NO/BAD to something other than the login."""

    kind = "protocol"


class ImapTimeout(ImapError, TransientError):
    """A command's answer, or the whole sync attempt, did not complete within its deadline
    (however often bytes trickled in). The connection is closed: its state is unknown."""

    kind = "timeout"


class ImapLimitExceeded(ImapError, PermanentError):
    """The server sent more than mailferry accepts for one line or one command (counted on the
    bytes received, not on what the server declared). The connection is closed."""

    kind = "protocol"


class LeaseLost(TransientError):
    """Another fetcher took over the mailbox's lease: stop writing, the newer one owns it."""


class LeaseHeld(TransientError):
    """The mailbox is being synced by another fetcher whose lease has not expired yet."""
