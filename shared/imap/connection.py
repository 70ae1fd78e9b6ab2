"""Connecting to an account: the address guard, TLS or STARTTLS, authentication, and errors.

Every failure leaves here as one ``shared.errors.ImapError`` subclass with a one-line message that
names the server, so a sync run and ``mailferry mailbox check`` can say what went wrong, and the
fetcher can tell a refused login (credentials invalid) from a transient fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import imaplib
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mailferry.errors import (
    ConfigError,
    ImapAuthError,
    ImapConnectionError,
    ImapError,
    ImapProtocolError,
    ImapThrottled,
    ImapTimeout,
    ImapTlsError,
)
from mailferry.imap import address, wire
from mailferry.imap.wire import Limits

Security = Literal["ssl", "starttls", "none"]

# Response codes that mean "the server cannot serve you now", not "your password is wrong"
# (RFC 5530 section 3).
_TRANSIENT_CODES = (b"[INUSE]", b"[SERVERBUG]", b"[LIMIT]")

# What providers answer when they limit an account (README "Provider limits"), on NO, BAD or BYE,
# at login or mid-sync. Response codes: [UNAVAILABLE] (RFC 5530 3: Dovecot's "Maximum number of
# connections from user+IP exceeded"), [THROTTLED] and [OVERQUOTA] (Gmail: "Account exceeded
# command or bandwidth limits"). Texts without a code: Gmail's "NO [ALERT] Too many simultaneous
# connections. (Failure)", Exchange Online's "Request is throttled. Suggested Backoff Time: N
# milliseconds" (then "* BYE Connection closed. 14") and "NO Server Unavailable. 15".
_THROTTLE_CODES = ("[UNAVAILABLE]", "[THROTTLED]", "[OVERQUOTA]")
_THROTTLE_TEXTS = re.compile(
    r"too many (simultaneous |concurrent )?connections|maximum number of connections"
    r"|request is throttled|throttl|rate.?limit|bandwidth limit|server unavailable",
    re.IGNORECASE)
_SUGGESTED_BACKOFF = re.compile(r"suggested backoff time:\s*(\d+)\s*millisec", re.IGNORECASE)


def throttled(where: str, answer: str) -> ImapThrottled | None:
    """The error to raise when ``answer`` (a NO, BAD or BYE text) says the provider limits this
    account; None when it says something else."""
    upper = answer.upper()
    if not any(code in upper for code in _THROTTLE_CODES) and not _THROTTLE_TEXTS.search(answer):
        return None
    suggested = _SUGGESTED_BACKOFF.search(answer)
    retry_after = int(suggested.group(1)) / 1000 if suggested else None
    return ImapThrottled(f"{where}: throttled by the server: {answer}", retry_after)


class ImapConfig(BaseModel):
    """Connection settings of one IMAP account; the password never appears in repr or logs.

    Built with keywords, or positionally as in ImapBundle:
    ``ImapConfig("imap.example.com", 993, "ssl", "user", "pwd")`` (then ``timeout``,
    ``ca_file``, ``allow_private_networks``, ``limits`` in that order). ``timeout`` bounds the
    silence between two reads, in seconds; connecting waits at most 30 s of it. ``limits``
    bounds what one command may cost (its deadline, line and response sizes, literals).
    """

    model_config = ConfigDict(frozen=True)
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    security: Security
    username: str = Field(min_length=1)
    password: SecretStr
    timeout: float = Field(default=60.0, gt=0)
    ca_file: Path | None = None
    allow_private_networks: bool = False
    limits: Limits = Limits()

    def __init__(self, host: str, port: int, security: Security, username: str,
                 password: str | SecretStr, timeout: float = 60.0, ca_file: Path | str | None = None,
                 allow_private_networks: bool = False, limits: Limits | None = None) -> None:
        super().__init__(host=host, port=port, security=security, username=username,
                         password=password, timeout=timeout, ca_file=ca_file,
                         allow_private_networks=allow_private_networks,
                         limits=limits or Limits())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificates and host names verified; a CA file replaces the system store when given."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def open_connection(config: ImapConfig) -> IMAPClient:
    """Resolve once, judge every address, and connect to exactly those (no DNS rebinding
    between the check and the connection); TLS still verifies the host name (SNI)."""
    where = config.address
    connect_timeout = min(config.timeout, 30.0)
    targets = address.resolve(config.host, config.port, allow_private=config.allow_private_networks)
    try:
        client = wire.Client(
            config.host, config.port, targets=targets,
            limits=dataclasses.replace(config.limits, read_timeout=config.timeout),
            tls=tls_context(config.ca_file) if config.security == "ssl" else None,
            connect_timeout=connect_timeout, where=where)
    except ImapTimeout as exc:
        raise ImapConnectionError(
            f"{where}: no IMAP greeting ({exc}); wrong port or security?") from exc
    except ImapError:
        raise
    except ssl.SSLCertVerificationError as exc:
        raise ImapTlsError(f"{where}: certificate not trusted: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        raise ImapTlsError(
            f"{where}: TLS handshake failed ({exc.reason or exc}); is this the implicit-TLS port?"
        ) from exc
    except ConnectionRefusedError as exc:
        raise ImapConnectionError(f"{where}: connection refused") from exc
    except TimeoutError as exc:
        raise ImapConnectionError(f"{where}: no answer within {connect_timeout:g}s") from exc
    except (imaplib.IMAP4.error, IMAPClientError) as exc:
        if (limited := throttled(where, text(exc))) is not None:  # a BYE greeting
            raise limited from exc
        raise ImapConnectionError(
            f"{where}: not an IMAP greeting ({text(exc)}); wrong port or security?"
        ) from exc
    except OSError as exc:
        raise ImapConnectionError(f"{where}: {exc.strerror or exc}") from exc
    if config.security == "starttls":
        _starttls(client, config)
    return client


def _starttls(client: IMAPClient, config: ImapConfig) -> None:
    where = config.address
    try:
        offered = client.has_capability("STARTTLS")
    except (IMAPClientError, OSError, ImapError) as exc:
        close(client)
        raise ImapConnectionError(f"{where}: CAPABILITY failed: {text(exc)}") from exc
    if not offered:
        close(client)
        # Never downgrade: the password would cross the network in clear text.
        raise ImapTlsError(f"{where}: STARTTLS is configured but the server does not offer it")
    try:
        client.starttls(tls_context(config.ca_file))
    except ssl.SSLCertVerificationError as exc:
        close(client)
        raise ImapTlsError(f"{where}: certificate not trusted: {exc.verify_message}") from exc
    except (ssl.SSLError, IMAPClientError, OSError, ImapError) as exc:
        close(client)
        raise ImapTlsError(f"{where}: STARTTLS failed: {text(exc)}") from exc


# --- authentication ------------------------------------------------------------------------------


class Authenticator(Protocol):
    """How a connector logs in: :class:`PasswordAuth` or :class:`OAuth2Auth`."""

    def authenticate(self, client: IMAPClient, config: ImapConfig) -> None: ...


class PasswordAuth:
    """``AUTHENTICATE PLAIN`` (RFC 4616: UTF-8 user names and passwords) when the server offers
    it, with SASL-IR (RFC 4959) when offered too; ``LOGIN`` otherwise, whose strings are 7-bit
    (RFC 3501 section 6.2.3)."""

    def authenticate(self, client: IMAPClient, config: ImapConfig) -> None:
        username, password = config.username, config.password.get_secret_value()
        _check_login_string(username, "user name", config, show=True, ascii_only=False)
        _check_login_string(password, "password", config, show=False, ascii_only=False)
        with _login_errors(config, client):
            plain = client.has_capability("AUTH=PLAIN")
        if plain:
            # authzid NUL authcid NUL passwd, authzid empty (RFC 4616 section 2).
            message = b"\0" + username.encode() + b"\0" + password.encode()
            with _login_errors(config, client):
                wire.authenticate(client, "PLAIN", message)
            return
        _check_login_string(username, "user name", config, show=True, ascii_only=True)
        _check_login_string(password, "password", config, show=False, ascii_only=True)
        # imaplib sends the user name of LOGIN as it is, unquoted: a space would split it and a
        # CRLF would end the command and start another one. It goes as a quoted string here
        # (RFC 3501 section 4.3), which cannot hold CR, LF or NUL.
        with _login_errors(config, client):
            client.login(_quote(username), password)


class TokenSource(Protocol):
    """Where an OAuth2 authenticator gets its access token: ``fresh=True`` asks for a newly
    refreshed one (the server refused the cached one). Raises ``ImapAuthError`` when the grant
    itself is refused, ``ImapConnectionError`` when the token endpoint cannot answer now."""

    def __call__(self, *, fresh: bool = False) -> str: ...


class OAuth2Auth:
    """``AUTHENTICATE OAUTHBEARER`` (RFC 7628) when the server offers it, ``XOAUTH2`` (Google's
    and Microsoft's older mechanism) otherwise. A refused token is refreshed once and tried
    again: the cached one may have been revoked or cut short by the provider; a fresh token
    refused too means the credentials are invalid (``ImapAuthError``)."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens
        self._stale = False

    def token_expired(self) -> None:
        """The server said the token expired (a BYE mid-sync): the next login refreshes it."""
        self._stale = True

    def authenticate(self, client: IMAPClient, config: ImapConfig) -> None:
        username = config.username
        _check_login_string(username, "user name", config, show=True, ascii_only=False)
        with _login_errors(config, client):
            bearer = client.has_capability("AUTH=OAUTHBEARER")
            xoauth2 = client.has_capability("AUTH=XOAUTH2")
        if not (bearer or xoauth2):
            raise ImapAuthError(f"{config.address}: the server offers neither AUTHENTICATE "
                                "OAUTHBEARER nor XOAUTH2, so it cannot take an OAuth2 token")
        mechanism = "OAUTHBEARER" if bearer else "XOAUTH2"
        stale, self._stale = self._stale, False
        for fresh in ((True,) if stale else (False, True)):
            token = self._tokens(fresh=fresh)
            _check_login_string(token, "access token", config, show=False, ascii_only=True)
            message = (_oauthbearer(username, token, config) if bearer
                       else _xoauth2(username, token))
            try:
                with _login_errors(config, client):
                    # RFC 7628 3.2.3: after an error challenge the client answers %x01.
                    wire.authenticate(client, mechanism, message,
                                      abort=b"\x01" if bearer else b"")
                return
            except ImapAuthError:
                if fresh:
                    raise


def _xoauth2(username: str, token: str) -> bytes:
    """``user=U^Aauth=Bearer T^A^A`` (Google's XOAUTH2 protocol, also Microsoft's)."""
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def _oauthbearer(username: str, token: str, config: ImapConfig) -> bytes:
    """RFC 7628 section 3.1: a GS2 header naming the user (``,`` and ``=`` escaped as in
    RFC 5801 section 4), then host, port and the bearer token, each ended by %x01."""
    saslname = username.replace("=", "=3D").replace(",", "=2C")
    return (f"n,a={saslname},\x01host={config.host}\x01port={config.port}\x01"
            f"auth=Bearer {token}\x01\x01").encode()


@contextmanager
def _login_errors(config: ImapConfig, client: IMAPClient) -> Iterator[None]:
    try:
        yield
    except ImapError:
        raise
    except (IMAPClientAbortError, OSError, EOFError) as exc:
        said = wire.bye(client) or text(exc)  # a BYE at login, then the connection closed
        if (limited := throttled(config.address, said)) is not None:
            raise limited from exc
        raise ImapConnectionError(f"{config.address}: connection lost during login") from exc
    except (IMAPClientError, imaplib.IMAP4.error) as exc:
        # A limit is never "credentials invalid": providers lock accounts that keep retrying.
        if (limited := throttled(config.address, text(exc))) is not None:
            raise limited from exc
        raw = text(exc).encode()
        if any(code in raw.upper() for code in _TRANSIENT_CODES):
            raise ImapConnectionError(
                f"{config.address}: server unavailable for login: {text(exc)}") from exc
        raise ImapAuthError(
            f"{config.address}: login refused for user {config.username!r}: {text(exc)}"
        ) from exc


def _check_login_string(value: str, what: str, config: ImapConfig, *, show: bool,
                        ascii_only: bool) -> None:
    shown = f" {value!r}" if show else ""
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{config.address}: the {what}{shown} contains a line break or NUL "
                          "character, which IMAP cannot carry")
    if ascii_only and not value.isascii():
        raise ConfigError(f"{config.address}: the {what}{shown} is not ASCII, which IMAP LOGIN "
                          "cannot carry, and the server does not offer AUTHENTICATE PLAIN")


def _quote(value: str) -> str:
    """An IMAP quoted string (RFC 3501 section 9, quoted-specials escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the connector ------------------------------------------------------------------------------


class ImapConnector:
    """One IMAP session for one account: connected and logged in at first use, closed by
    ``close()`` or at the end of a ``with`` block. Not thread-safe (neither is IMAP)."""

    def __init__(self, config: ImapConfig, authenticator: Authenticator | None = None) -> None:
        self._config = config
        self._authenticator = authenticator or PasswordAuth()
        self._client: IMAPClient | None = None
        self._deadline: float | None = None

    @property
    def config(self) -> ImapConfig:
        return self._config

    @property
    def where(self) -> str:
        """``host:port``, the prefix of every error message."""
        return self._config.address

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def usable(self) -> bool:
        """Connected, and not closed under a limit (a deadline, an oversized answer)."""
        return self._client is not None and wire.broken(self._client) is None

    def connect(self) -> ImapConnector:
        """Connect and log in now (otherwise done at first use); raises ``ImapAuthError`` for
        refused credentials, ``ImapConnectionError`` / ``ImapTlsError`` for the rest."""
        if self._client is None:
            client = open_connection(self._config)
            try:
                wire.set_attempt_deadline(client, self._deadline)
                self._authenticator.authenticate(client, self._config)
            except BaseException:
                close(client)
                raise
            self._client = client
        return self

    def set_deadline(self, deadline: float | None) -> None:
        """A wall-clock bound (``time.monotonic()``) on every read from now on, whatever the
        commands' own deadlines: a sync attempt's deadline."""
        self._deadline = deadline
        if self._client is not None:
            wire.set_attempt_deadline(self._client, deadline)

    @property
    def client(self) -> IMAPClient:
        """The logged-in imapclient session, for what this library does not cover. Its reads
        are bounded like the library's own."""
        client = self.connect()._client
        assert client is not None
        return client

    def capabilities(self) -> frozenset[str]:
        with imap_errors(self.where):
            return frozenset(c.decode("ascii", "replace").upper()
                             for c in self.client.capabilities())

    def has_capability(self, name: str) -> bool:
        return name.upper() in self.capabilities()

    def close(self) -> None:
        """Log out (or drop the connection); the connector can connect again afterwards."""
        client, self._client = self._client, None
        if client is not None:
            close(client)

    def __enter__(self) -> ImapConnector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<ImapConnector {self._config.username}@{self.where} {state}>"


class ImapConnectorFactory:
    """Makes connectors; the point where tests or other transports plug in."""

    def create_imap_connector(self, config: ImapConfig,
                              authenticator: Authenticator | None = None) -> ImapConnector:
        return ImapConnector(config, authenticator)


connector_factory = ImapConnectorFactory()


def close(client: IMAPClient) -> None:
    if wire.broken(client) is not None:  # closed under a limit already
        return
    try:
        client.logout()
    except Exception:  # already dropped: closing the socket is all that is left
        with contextlib.suppress(Exception):
            client.shutdown()


@contextmanager
def imap_errors(where: str) -> Iterator[None]:
    """Turn imapclient/socket exceptions raised inside into our hierarchy."""
    try:
        yield
    except ImapError:
        raise
    except (TimeoutError, IMAPClientAbortError, OSError, EOFError) as exc:
        if (limited := throttled(where, text(exc))) is not None:  # a BYE with a limit's text
            raise limited from exc
        raise ImapConnectionError(f"{where}: connection lost: {text(exc)}") from exc
    except (IMAPClientError, imaplib.IMAP4.error) as exc:
        if (limited := throttled(where, text(exc))) is not None:
            raise limited from exc
        raise ImapProtocolError(f"{where}: {text(exc)}") from exc


def text(exc: BaseException) -> str:
    """An exception as one line (imaplib's come as ``b'...'`` reprs)."""
    line = " ".join(str(exc).split())
    if line.startswith("b'") or line.startswith('b"'):
        line = line[2:-1]
    return line or type(exc).__name__
