"""OAuth2 credentials: providers, endpoints, and the life cycle of a mailbox's tokens.

The protocol work (token requests, PKCE, JWT signing) is Authlib's, over requests; this module
decides *when* to ask and what a provider's answer means for a sync:

- an access token is cached encrypted (MAILFERRY_SECRET_KEY, like passwords) with its expiry,
  and refreshed when less than 20% of its lifetime is left, so a sync never starts on a token
  about to die;
- one refresh per mailbox at a time, across every fetcher and host: the refresh runs while the
  mailbox's ``oauth_tokens`` row is locked (``SELECT ... FOR UPDATE``). Refreshing the same
  refresh token twice can invalidate it (rotation), so the second caller waits, then finds the
  new access token and uses it;
- a rotated refresh token (Microsoft rotates them) is stored in the same transaction, at once;
- ``invalid_grant`` (revoked, expired, a changed password: RFC 6749 section 5.2) is the OAuth2
  form of a refused password: :class:`GrantInvalid` is an ``ImapAuthError``, so the fetcher takes
  the same path (the run fails with kind ``auth``, ``CredentialsInvalid`` is published, people
  are told once), with a message that says how to re-authorize;
- 429, 5xx and timeouts of the token endpoint are :class:`TokenEndpointUnavailable`, an
  ``ImapConnectionError``: transient, retried with the worker's backoff, nobody told; a
  ``Retry-After`` rides on it as ``retry_after``, and the worker's retry waits at least that.

Nothing here logs or raises a token, a client secret or a key: messages name the provider and
the mailbox, never a credential.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog

from mailferry import metrics
from mailferry.crypto import PasswordBox
from mailferry.db import Connection
from mailferry.errors import ConfigError, ImapAuthError, ImapConnectionError, InvalidInput
from mailferry.imap import OAuth2Auth
from mailferry.mime import clean_text

if TYPE_CHECKING:  # the HTTP stack (Authlib, requests: a third of a CLI's start-up) loads on use
    import requests
    from authlib.integrations.requests_client import OAuth2Session
    from joserfc.jwk import RSAKey

log = structlog.get_logger(__name__)

PROVIDER_KINDS = ("google", "microsoft", "generic")
AUTH_KINDS = ("password", "oauth2", "oauth2-app")
#: Refresh when less than this share of the access token's lifetime is left.
REFRESH_WHEN_LEFT = 0.2
#: An access token without ``expires_in`` is taken to last this long (RFC 6749 5.1: optional).
DEFAULT_LIFETIME = 3600.0
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"

#: IMAP servers of the presets: host, port, security.
MAILBOX_PRESETS: dict[str, tuple[str, int, str]] = {
    "gmail": ("imap.gmail.com", 993, "ssl"),
    "outlook": ("outlook.office365.com", 993, "ssl"),
}


@dataclass(frozen=True)
class Endpoints:
    token_url: str
    authorize_url: str | None
    device_url: str | None
    userinfo_url: str | None
    scopes: tuple[str, ...]
    app_scopes: tuple[str, ...]


def default_endpoints(kind: str, tenant: str | None) -> Endpoints | None:
    """The endpoints and scopes a ``google`` or ``microsoft`` provider has unless overridden."""
    if kind == "google":
        return Endpoints(
            token_url="https://oauth2.googleapis.com/token",
            authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
            device_url="https://oauth2.googleapis.com/device/code",
            userinfo_url="https://openidconnect.googleapis.com/v1/userinfo",
            scopes=("https://mail.google.com/", "openid", "email"),
            app_scopes=("https://mail.google.com/",))
    if kind == "microsoft":
        base = f"https://login.microsoftonline.com/{tenant or 'common'}/oauth2/v2.0"
        return Endpoints(
            token_url=f"{base}/token", authorize_url=f"{base}/authorize",
            device_url=f"{base}/devicecode",
            userinfo_url="https://graph.microsoft.com/oidc/userinfo",
            scopes=("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access",
                    "openid", "email"),
            app_scopes=("https://outlook.office365.com/.default",))
    return None


def check_endpoint(url: str, what: str) -> str:
    """``https://``, or plain ``http://`` on a loopback address only (127.0.0.0/8, ::1), as
    RFC 8252 section 8.3 allows for native apps' redirects: a token must not cross a network
    in clear text."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or any(
            ord(c) < 0x21 for c in url):
        raise InvalidInput(f"{what}: must be an https:// URL")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise InvalidInput(f"{what}: must be https:// (plain http:// only on a loopback "
                               "address such as 127.0.0.1)")
    return url


#: What servers say when an access token dies in the middle of a session: Microsoft's
#: ``* BYE Session invalidated - AccessTokenExpired``, RFC 5530's [EXPIRED] and
#: [AUTHENTICATIONFAILED] codes, and the plain words others use.
_TOKEN_EXPIRED = re.compile(r"AccessTokenExpired|\[EXPIRED\]|\[AUTHENTICATIONFAILED\]|"
                            r"token (has )?expired|session invalidated", re.IGNORECASE)


def token_expired(error: BaseException) -> bool:
    """Whether an IMAP error mid-sync means "your access token expired": then a refresh and a
    new login let the sync go on."""
    return bool(_TOKEN_EXPIRED.search(str(error)))


# --- errors -------------------------------------------------------------------------------------


class GrantInvalid(ImapAuthError):
    """The provider refused the grant (``invalid_grant``...): credentials invalid until someone
    re-authorizes the mailbox."""


class TokenEndpointUnavailable(ImapConnectionError):
    """The token endpoint answered 429 or 5xx, or not in time: try again later, and not before
    ``retry_after`` seconds when the provider said so (``Retry-After``)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after(resp: requests.Response | None) -> float | None:
    """The seconds an HTTP ``Retry-After`` header asks for (RFC 9110 section 10.2.3: seconds
    or an HTTP date; urllib3 parses both), None when absent or unreadable."""
    from urllib3.exceptions import InvalidHeader
    from urllib3.util import Retry

    value = resp.headers.get("Retry-After") if resp is not None else None
    if not value:
        return None
    try:
        return float(Retry().parse_retry_after(value))
    except (InvalidHeader, ValueError, TypeError, OverflowError):
        return None


# --- providers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    id: int
    name: str
    kind: str
    client_id: str
    client_secret_encrypted: bytes | None
    service_account_key_encrypted: bytes | None
    tenant: str | None
    token_url: str
    authorize_url: str | None
    device_url: str | None
    userinfo_url: str | None
    scopes: list[str]
    app_scopes: list[str]

    @property
    def acts_alone(self) -> bool:
        """Whether it can give app-only access (oauth2-app): a client secret or a key."""
        return bool(self.client_secret_encrypted or self.service_account_key_encrypted)

    def client_secret(self, box: PasswordBox) -> str | None:
        enc = self.client_secret_encrypted
        return box.decrypt(enc) if enc else None

    def service_account_key(self, box: PasswordBox) -> dict[str, Any] | None:
        enc = self.service_account_key_encrypted
        return json.loads(box.decrypt(enc)) if enc else None


PROVIDER_COLUMNS = """p.id, p.name, p.kind, p.client_id, p.client_secret_encrypted,
    p.service_account_key_encrypted, p.tenant, p.token_url, p.authorize_url, p.device_url,
    p.userinfo_url, p.scopes, p.app_scopes"""


def provider_by_name(conn: Connection, name: str) -> Provider:
    row = conn.execute(f"SELECT {PROVIDER_COLUMNS} FROM oauth_providers p "
                       "WHERE lower(p.name) = lower(%s)", (name,)).fetchone()
    if row is None:
        raise InvalidInput(f"no OAuth2 provider named {name!r}; add it with "
                           "`mailferry oauth provider add`")
    return _provider(row)


def providers_by_name(conn: Connection, names: Sequence[str]) -> dict[str, Provider]:
    """The providers of these names (any case), in one query, keyed by the lowercased name;
    unknown names are left out."""
    rows = conn.execute(f"SELECT {PROVIDER_COLUMNS} FROM oauth_providers p "
                        "WHERE lower(p.name) = ANY(%s)",
                        (sorted({n.lower() for n in names}),)).fetchall() if names else []
    return {row["name"].lower(): _provider(row) for row in rows}


def _provider(row: dict[str, Any]) -> Provider:
    fields = Provider.__dataclass_fields__
    values = {k: v for k, v in row.items() if k in fields}
    for key in ("client_secret_encrypted", "service_account_key_encrypted"):
        if values[key] is not None:
            values[key] = bytes(values[key])
    return Provider(**values)


# --- talking to the token endpoint --------------------------------------------------------------


def _raise_unavailable(provider: Provider) -> Callable[[requests.Response], requests.Response]:
    def hook(resp: requests.Response) -> requests.Response:
        if resp.status_code == 429 or resp.status_code >= 500:
            wait = retry_after(resp)
            raise TokenEndpointUnavailable(
                f"OAuth2 provider {provider.name}: token endpoint answered HTTP "
                f"{resp.status_code}" + (f" (retry after {wait:g}s)" if wait is not None else ""),
                retry_after=wait)
        return resp
    return hook


def _private_key(provider: Provider, account: dict[str, Any]) -> RSAKey:
    from joserfc.jwk import RSAKey

    try:
        return RSAKey.import_key(str(account.get("private_key")))
    except (ValueError, TypeError):
        raise ConfigError(f"OAuth2 provider {provider.name}: the service account's private key "
                          "cannot be read") from None


def client(provider: Provider, box: PasswordBox, *, timeout: float, scope: Sequence[str] = (),
           redirect_uri: str | None = None,
           code_challenge_method: str | None = None) -> OAuth2Session:
    """An Authlib client for the provider's token endpoint, with 429/5xx made transient."""
    from authlib.integrations.requests_client import OAuth2Session

    check_endpoint(provider.token_url, f"provider {provider.name}'s token URL")
    session = OAuth2Session(
        client_id=provider.client_id, client_secret=provider.client_secret(box),
        token_endpoint=provider.token_url,
        token_endpoint_auth_method="client_secret_post" if provider.client_secret_encrypted
        else "none",
        scope=" ".join(scope) or None, redirect_uri=redirect_uri,
        code_challenge_method=code_challenge_method, default_timeout=timeout)
    session.trust_env = False  # no proxy from the environment: tokens go where configured
    session.register_compliance_hook("access_token_response", _raise_unavailable(provider))
    session.register_compliance_hook("refresh_token_response", _raise_unavailable(provider))
    return session


#: Token endpoint errors that no retry can fix (RFC 6749 section 5.2).
_REFUSALS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope",
                       "access_denied", "invalid_request", "unsupported_grant_type"})


def token_request(provider: Provider, what: str, call: Callable[[], Any]) -> dict[str, Any]:
    """Run one token request, turning what can go wrong into mailferry's errors."""
    import requests
    from authlib.integrations.base_client.errors import OAuthError

    try:
        token = call()
    except OAuthError as exc:
        error = clean_text(exc.error or "error")[:100]
        detail = clean_text(exc.description or "")[:200]
        if error not in _REFUSALS:  # a busy or rate-limited endpoint (slow_down, ...)
            raise TokenEndpointUnavailable(
                f"OAuth2 provider {provider.name}: {what}: {error}") from None
        raise GrantInvalid(f"OAuth2 provider {provider.name} refused the {what} ({error}"
                           + (f": {detail}" if detail else "") + ")") from None
    except TokenEndpointUnavailable:
        raise
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 429 or status >= 500:
            raise TokenEndpointUnavailable(
                f"OAuth2 provider {provider.name}: token endpoint answered HTTP "
                f"{status}", retry_after=retry_after(exc.response)) from None
        raise GrantInvalid(f"OAuth2 provider {provider.name} refused the {what} "
                           f"(HTTP {status})") from None
    except requests.Timeout:
        raise TokenEndpointUnavailable(
            f"OAuth2 provider {provider.name}: token endpoint did not answer in time") from None
    except (requests.ConnectionError, OSError) as exc:
        raise TokenEndpointUnavailable(
            f"OAuth2 provider {provider.name}: token endpoint unreachable "
            f"({type(exc).__name__})") from None
    except ValueError:
        raise TokenEndpointUnavailable(
            f"OAuth2 provider {provider.name}: token endpoint sent no JSON token") from None
    if not isinstance(token, dict) or not token.get("access_token"):
        raise TokenEndpointUnavailable(
            f"OAuth2 provider {provider.name}: token endpoint sent no access token")
    return dict(token)


def refresh(provider: Provider, box: PasswordBox, refresh_token: str, *,
            timeout: float) -> dict[str, Any]:
    """A new access token for a refresh token (RFC 6749 section 6)."""
    with client(provider, box, timeout=timeout) as session:
        return token_request(provider, "refresh token", lambda: session.refresh_token(
            provider.token_url, refresh_token=refresh_token))


def app_token(provider: Provider, box: PasswordBox, username: str, *,
              timeout: float) -> dict[str, Any]:
    """An app-only access token: Microsoft's client credentials grant (RFC 6749 4.4), or a
    Google service account's JWT bearer grant (RFC 7523) impersonating ``username``
    (domain-wide delegation)."""
    from authlib.integrations.requests_client import AssertionSession

    scope = " ".join(provider.app_scopes or provider.scopes)
    key = provider.service_account_key(box)
    if key is not None:
        token_url = provider.token_url
        with AssertionSession(
                token_endpoint=token_url, issuer=key.get("client_email"), subject=username,
                audience=token_url, grant_type=JWT_BEARER,
                claims={"scope": scope}, scope=scope, key=_private_key(provider, key),
                header={"alg": "RS256", "kid": key.get("private_key_id")},
                default_timeout=timeout) as assertion:
            assertion.trust_env = False
            return token_request(provider, "service account assertion",
                                 assertion.refresh_token)
    if not provider.client_secret_encrypted:
        raise ConfigError(f"OAuth2 provider {provider.name} has neither a client secret nor a "
                          "service account key: app-only access needs one")
    with client(provider, box, timeout=timeout, scope=[scope]) as session:
        return token_request(provider, "client credentials", lambda: session.fetch_token(
            provider.token_url, grant_type="client_credentials"))


# --- a mailbox's tokens ---------------------------------------------------------------------------


_TOKEN_ROW = f"""SELECT t.refresh_token_encrypted, t.access_token_encrypted,
       t.access_token_expires_at, t.access_token_issued_at, m.auth_kind, m.username, m.id,
       {PROVIDER_COLUMNS}
  FROM oauth_tokens t JOIN oauth_providers p ON p.id = t.provider_id
  JOIN mailboxes m ON m.id = t.mailbox_id
 WHERE t.mailbox_id = %s"""


def fresh_enough(expires_at: datetime | None, issued_at: datetime | None,
                 now: datetime) -> bool:
    """Whether a cached access token still has at least 20% of its lifetime left."""
    if expires_at is None or issued_at is None or expires_at <= now:
        return False
    lifetime = (expires_at - issued_at).total_seconds()
    return (expires_at - now).total_seconds() >= REFRESH_WHEN_LEFT * max(lifetime, 1.0)


#: Lends an autocommit connection for the length of one call: what a holder that lives longer
#: than a transaction and has no connection of its own (a push watch) gives a token source.
LendConnection = Callable[[], AbstractContextManager[Connection]]


class MailboxTokens:
    """The access tokens of one OAuth2 mailbox: an ``OAuth2Auth`` token source.

    ``conn`` must be in autocommit mode: each call is its own short transaction that holds the
    token row's lock while it refreshes. It is a connection, or a :data:`LendConnection` that
    lends one per call (a watch logs in about once an hour and holds no connection between)."""

    def __init__(self, conn: Connection | LendConnection, box: PasswordBox, mailbox_id: int, *,
                 timeout: float = 30.0, clock: Callable[[], datetime] | None = None) -> None:
        if callable(conn):
            self._lend: LendConnection = conn
        else:
            own = conn
            self._lend = lambda: nullcontext(own)
        self._box = box
        self._mailbox_id = mailbox_id
        self._timeout = timeout
        self._now = clock or (lambda: datetime.now(UTC))
        self._used: bytes | None = None  # the encrypted token last handed out

    def __call__(self, *, fresh: bool = False) -> str:
        with self._lend() as conn:
            return self._token(conn, fresh)

    def _token(self, conn: Connection, fresh: bool) -> str:
        failure: Exception | None = None
        with conn.transaction():
            row = conn.execute(_TOKEN_ROW + " FOR UPDATE OF t", (self._mailbox_id,)).fetchone()
            if row is None:
                raise ConfigError(f"mailbox {self._mailbox_id} has no OAuth2 credentials")
            cached = bytes(row["access_token_encrypted"]) if row["access_token_encrypted"] else None
            now = self._now()
            usable = fresh_enough(row["access_token_expires_at"], row["access_token_issued_at"], now)
            # Asked for a fresh one: a token someone else stored since ours is fresh already.
            if usable and cached is not None and (not fresh or cached != self._used):
                self._used = cached
                return self._box.decrypt(cached)
            provider = _provider(row)
            try:
                token = self._request(provider, row)
            except (GrantInvalid, TokenEndpointUnavailable, ConfigError) as exc:
                failure = exc
                outcome = ("refused" if isinstance(exc, GrantInvalid) else
                           "unavailable" if isinstance(exc, TokenEndpointUnavailable) else "error")
                metrics.TOKEN_REFRESHES.labels(provider.kind, outcome).inc()
            else:
                metrics.TOKEN_REFRESHES.labels(provider.kind, "refreshed").inc()
                return self._store(conn, row, token, now)
        # Recorded outside the rolled-back transaction; the refresh token stays as it was.
        conn.execute(
            """UPDATE oauth_tokens SET last_refresh_error = %s, updated_at = now()
                WHERE mailbox_id = %s""", (str(failure)[:500], self._mailbox_id))
        if isinstance(failure, GrantInvalid):
            raise GrantInvalid(f"{failure}; {reauthorize_hint(self._mailbox_id, row)}")
        raise failure

    def _request(self, provider: Provider, row: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        if row["auth_kind"] == "oauth2-app":
            token = app_token(provider, self._box, row["username"], timeout=self._timeout)
        else:
            if not row["refresh_token_encrypted"]:
                raise GrantInvalid(f"mailbox {self._mailbox_id} has no refresh token")
            refresh_token = self._box.decrypt(bytes(row["refresh_token_encrypted"]))
            token = refresh(provider, self._box, refresh_token, timeout=self._timeout)
            token["rotated"] = bool(token.get("refresh_token")) and (
                token["refresh_token"] != refresh_token)
        log.info("oauth.token_refreshed", provider=provider.name,
                 seconds=round(time.monotonic() - started, 3),
                 expires_in=token.get("expires_in"), rotated=token.get("rotated", False))
        return token

    def _store(self, conn: Connection, row: dict[str, Any], token: dict[str, Any],
               now: datetime) -> str:
        try:
            lifetime = float(token.get("expires_in") or DEFAULT_LIFETIME)
        except (TypeError, ValueError):
            lifetime = DEFAULT_LIFETIME
        access = str(token["access_token"])
        encrypted = self._box.encrypt(access)
        rotated = self._box.encrypt(str(token["refresh_token"])) if token.get("rotated") else None
        conn.execute(
            """UPDATE oauth_tokens
                  SET access_token_encrypted = %s, access_token_issued_at = %s,
                      access_token_expires_at = %s, last_refreshed_at = %s,
                      refresh_token_encrypted = COALESCE(%s, refresh_token_encrypted),
                      last_refresh_error = NULL, updated_at = now()
                WHERE mailbox_id = %s""",
            (encrypted, now, now + timedelta(seconds=max(lifetime, 1.0)), now, rotated,
             self._mailbox_id))
        self._used = encrypted
        return access


def authenticator(mailbox: Any, conn: Connection | LendConnection, box: PasswordBox, *,
                  timeout: float) -> OAuth2Auth | None:
    """The OAuth2 authenticator of an OAuth2 mailbox (None: it logs in with its password).
    ``conn``: an autocommit connection the token row is locked and updated on, or a lender of
    one per call (:class:`MailboxTokens`)."""
    if mailbox.auth_kind == "password":
        return None
    return OAuth2Auth(MailboxTokens(conn, box, mailbox.id, timeout=timeout))


def rotate_secrets(conn: Connection, box: PasswordBox) -> None:
    """Re-encrypt the stored OAuth2 secrets with the box's first key (``keys rotate``)."""
    for table, key, columns in (
            ("oauth_providers", "id", ("client_secret_encrypted", "service_account_key_encrypted")),
            ("oauth_tokens", "mailbox_id", ("refresh_token_encrypted", "access_token_encrypted"))):
        for column in columns:
            rows = conn.execute(f"SELECT {key} AS id, {column} AS value FROM {table} "
                                f"WHERE {column} IS NOT NULL FOR UPDATE").fetchall()
            for row in rows:
                conn.execute(f"UPDATE {table} SET {column} = %s WHERE {key} = %s",
                             (box.rotate(bytes(row["value"])), row["id"]))


def reauthorize_hint(mailbox_id: int, row: dict[str, Any]) -> str:
    """What the person must do when the grant is refused: the command that fixes it."""
    if row.get("auth_kind") == "oauth2-app":
        return (f"check the app's admin consent with OAuth2 provider {row.get('name')}, then "
                f"`mailferry sync --mailbox {mailbox_id}`")
    return (f"re-authorize: `mailferry oauth authorize --provider {row.get('name')} ...` or "
            f"`mailferry mailbox update {mailbox_id} --refresh-token-stdin`")


# --- getting a refresh token: authorization code + PKCE, device authorization -------------------


@dataclass(frozen=True)
class Grant:
    """What an authorization gives: the refresh token and the mailbox's address."""

    refresh_token: str
    email: str


class _Redirect(BaseHTTPRequestHandler):
    """The loopback redirect target (RFC 8252 section 7.3): takes the first request's query."""

    server: _RedirectServer

    def do_GET(self) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        if "code" not in query and "error" not in query:
            self.send_response(404)
            self.end_headers()
            return
        self.server.answer = query
        body = b"mailferry: authorization received; you can close this window.\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RedirectServer(HTTPServer):
    answer: dict[str, str] | None = None


def authorize_code(provider: Provider, box: PasswordBox, show: Callable[[str], None], *,
                   timeout: float = 300.0, port: int = 0) -> Grant:
    """The authorization-code grant with PKCE (RFC 7636) and a loopback redirect on
    127.0.0.1, as desktop mail programs do: ``show`` gets the URL to open; the provider sends
    the browser back to ``http://127.0.0.1:<port>/`` with the code."""
    from authlib.common.security import generate_token

    if not provider.authorize_url:
        raise ConfigError(f"OAuth2 provider {provider.name} has no authorization URL")
    check_endpoint(provider.authorize_url, f"provider {provider.name}'s authorization URL")
    server = _RedirectServer(("127.0.0.1", port), _Redirect)
    server.timeout = 0.5
    redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with client(provider, box, timeout=30.0, scope=provider.scopes,
                    redirect_uri=redirect_uri, code_challenge_method="S256") as session:
            verifier = generate_token(64)
            extra = {"access_type": "offline", "prompt": "consent"} if provider.kind == "google" \
                else {}
            url, state = session.create_authorization_url(provider.authorize_url,
                                                          code_verifier=verifier, **extra)
            show(url)
            deadline = time.monotonic() + timeout
            while server.answer is None:
                if time.monotonic() > deadline:
                    raise ConfigError(f"no authorization within {timeout:g}s")
                server.handle_request()
            answer = server.answer
            if answer.get("error"):
                raise GrantInvalid(f"OAuth2 provider {provider.name}: authorization refused "
                                   f"({clean_text(answer['error'])[:100]})")
            if answer.get("state") != state:
                raise GrantInvalid("the authorization answer does not match the request (state)")
            token = token_request(provider, "authorization code", lambda: session.fetch_token(
                provider.token_url, code=answer["code"], code_verifier=verifier,
                redirect_uri=redirect_uri))
            return _grant(provider, session, token)
    finally:
        server.server_close()


def authorize_device(provider: Provider, box: PasswordBox, show: Callable[[str], None], *,
                     timeout: float = 600.0) -> Grant:
    """The device authorization grant (RFC 8628), for machines without a browser: ``show``
    gets the page to visit and the code to type; the token endpoint is polled meanwhile."""
    import requests
    from authlib.integrations.base_client.errors import OAuthError

    if not provider.device_url:
        raise ConfigError(f"OAuth2 provider {provider.name} has no device authorization URL")
    check_endpoint(provider.device_url, f"provider {provider.name}'s device URL")
    with client(provider, box, timeout=30.0, scope=provider.scopes) as session:
        form = {"client_id": provider.client_id, "scope": " ".join(provider.scopes)}
        try:
            resp = session.post(provider.device_url, data=form, withhold_token=True)
            resp.raise_for_status()
            device = resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise TokenEndpointUnavailable(f"OAuth2 provider {provider.name}: device "
                                           f"authorization failed ({type(exc).__name__})") from None
        page = device.get("verification_uri_complete") or device.get("verification_uri")
        show(f"Visit {page} and enter the code {device.get('user_code')}")
        interval = float(device.get("interval") or 5)
        deadline = time.monotonic() + min(timeout, float(device.get("expires_in") or timeout))
        while True:
            try:
                token = session.fetch_token(provider.token_url, grant_type=DEVICE_CODE,
                                            device_code=device.get("device_code"))
                break
            except OAuthError as exc:
                if exc.error not in ("authorization_pending", "slow_down"):
                    token_request(provider, "device code", functools.partial(_raise, exc))
                interval += 5 if exc.error == "slow_down" else 0  # RFC 8628 section 3.5
            if time.monotonic() + interval > deadline:
                raise ConfigError(f"no authorization within {timeout:g}s")
            time.sleep(interval)
        return _grant(provider, session, token_request(provider, "device code", lambda: token))


def _raise(exc: Exception) -> Any:
    raise exc


def _grant(provider: Provider, session: OAuth2Session, token: dict[str, Any]) -> Grant:
    refresh_token = token.get("refresh_token")
    if not refresh_token:
        raise GrantInvalid(f"OAuth2 provider {provider.name} gave no refresh token (ask for "
                           "offline access: the offline_access scope, or Google's consent)")
    return Grant(str(refresh_token), _email(provider, session, token))


def _email(provider: Provider, session: OAuth2Session, token: dict[str, Any]) -> str:
    """The ``email`` claim of the ID token when there is one, otherwise the user-info
    endpoint's. The ID token came straight from the token endpoint over TLS (or loopback), so
    its signature need not be checked (OpenID Connect Core 1.0 section 3.1.3.7, item 6)."""
    import requests
    from joserfc import jws

    id_token = token.get("id_token")
    if id_token:
        try:
            claims = json.loads(jws.extract_compact(str(id_token).encode()).payload)
        except (ValueError, TypeError):
            claims = {}
        if isinstance(claims, dict) and isinstance(claims.get("email"), str):
            return str(claims["email"])
    if not provider.userinfo_url:
        raise ConfigError(f"OAuth2 provider {provider.name} gave no email in an ID token and "
                          "has no user-info URL: give the address with `mailbox add`")
    check_endpoint(provider.userinfo_url, f"provider {provider.name}'s user-info URL")
    try:
        resp = session.get(provider.userinfo_url, headers={
            "Authorization": f"Bearer {token['access_token']}"}, withhold_token=True)
        resp.raise_for_status()
        info = resp.json()
    except (requests.RequestException, ValueError) as exc:
        raise TokenEndpointUnavailable(f"OAuth2 provider {provider.name}: user-info failed "
                                       f"({type(exc).__name__})") from None
    email = info.get("email") or info.get("mail") or info.get("preferred_username")
    if not isinstance(email, str) or "@" not in email:
        raise ConfigError(f"OAuth2 provider {provider.name}'s user-info has no email address")
    return email
