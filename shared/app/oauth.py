"""OAuth2 providers and OAuth2 mailboxes: the service layer behind ``mailferry oauth`` and
``mailbox add --auth oauth2``.

Secrets (client secrets, refresh tokens, service account keys) are stored encrypted with the
:class:`~mailferry.crypto.PasswordBox`, like passwords, and no function here returns one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from mailferry import db, oauth
from mailferry.app import validation as valid
from mailferry.app.mailboxes import Updated, get_mailbox, insert_mailbox, user_id_by_email
from mailferry.app.publishing import Publish
from mailferry.crypto import PasswordBox
from mailferry.errors import ConfigError, InvalidInput, MailferryError
from mailferry.sync_requests import request_syncs

# --- providers ----------------------------------------------------------------------------------


def add_provider(conn: db.Connection, box: PasswordBox, *, name: str, kind: str, client_id: str,
                 client_secret: str | None = None, tenant: str | None = None,
                 token_url: str | None = None, authorize_url: str | None = None,
                 device_url: str | None = None, userinfo_url: str | None = None,
                 scopes: Sequence[str] = (), app_scopes: Sequence[str] = (),
                 service_account_key: str | None = None) -> int:
    """Register an identity provider. ``google`` and ``microsoft`` fill the endpoints and
    scopes (any of them can be overridden, e.g. to point at a local identity provider);
    ``generic`` needs ``token_url``. Endpoints must be https:// (http:// on loopback only).
    ``service_account_key``: a Google service account's JSON key, for app-only access."""
    valid.printable(name, "--name")
    if not name or len(name) > 100:
        raise InvalidInput("--name: must be 1 to 100 characters long")
    if kind not in oauth.PROVIDER_KINDS:
        raise InvalidInput(f"--kind: must be one of {', '.join(oauth.PROVIDER_KINDS)}")
    valid.printable(client_id, "--client-id")
    if not client_id:
        raise InvalidInput("--client-id: must not be empty")
    if tenant is not None:
        valid.printable(tenant, "--tenant")
    for scope in [*scopes, *app_scopes]:
        valid.printable(scope, "--scope")
    defaults = oauth.default_endpoints(kind, tenant)
    token_url = token_url or (defaults.token_url if defaults else None)
    if token_url is None:
        raise InvalidInput("--token-url: a generic provider needs its token endpoint")
    urls = {
        "--token-url": token_url,
        "--authorize-url": authorize_url or (defaults.authorize_url if defaults else None),
        "--device-url": device_url or (defaults.device_url if defaults else None),
        "--userinfo-url": userinfo_url or (defaults.userinfo_url if defaults else None),
    }
    for what, url in urls.items():
        if url is not None:
            oauth.check_endpoint(url, what)
    key_json = None
    if service_account_key is not None:
        try:
            key = json.loads(service_account_key)
        except ValueError:
            key = None
        if not isinstance(key, dict) or not key.get("private_key") or not key.get("client_email"):
            raise InvalidInput("--service-account-key-file: not a service account key (JSON "
                               "with client_email and private_key)")
        key_json = json.dumps(key)
    row = conn.execute(
        """INSERT INTO oauth_providers (name, kind, client_id, client_secret_encrypted,
               service_account_key_encrypted, tenant, token_url, authorize_url, device_url,
               userinfo_url, scopes, app_scopes)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT DO NOTHING RETURNING id""",
        (name, kind, client_id, box.encrypt(client_secret) if client_secret else None,
         box.encrypt(key_json) if key_json else None, tenant, urls["--token-url"],
         urls["--authorize-url"], urls["--device-url"], urls["--userinfo-url"],
         list(scopes) or list(defaults.scopes if defaults else ()),
         list(app_scopes) or list(defaults.app_scopes if defaults else ())),
    ).fetchone()
    if row is None:
        raise MailferryError(f"an OAuth2 provider named {name!r} already exists")
    return int(row["id"])


def list_providers(conn: db.Connection) -> list[dict[str, Any]]:
    """Providers with their endpoints and scopes; whether a secret or key is stored, never it."""
    return conn.execute(
        """SELECT id, name, kind, client_id, tenant, token_url, authorize_url, device_url,
                  userinfo_url, scopes, app_scopes,
                  client_secret_encrypted IS NOT NULL AS has_client_secret,
                  service_account_key_encrypted IS NOT NULL AS has_service_account_key,
                  (SELECT count(*) FROM oauth_tokens t WHERE t.provider_id = p.id) AS mailboxes
             FROM oauth_providers p ORDER BY id""").fetchall()


# --- mailboxes ----------------------------------------------------------------------------------


def server_settings(preset: str | None, host: str | None, port: int | None,
                    security: str | None) -> tuple[str, int, str]:
    """Host, port and security from ``--preset gmail|outlook``, each overridable."""
    if preset is not None and preset not in oauth.MAILBOX_PRESETS:
        raise InvalidInput(f"--preset: must be one of {', '.join(oauth.MAILBOX_PRESETS)}")
    base = oauth.MAILBOX_PRESETS.get(preset or "", (None, None, None))
    host, port, security = host or base[0], port or base[1], security or base[2]
    if host is None or port is None or security is None:
        raise InvalidInput("give --preset gmail|outlook, or --host, --port and --security")
    return host, port, security


def add_oauth_mailbox(conn: db.Connection, box: PasswordBox, *, owner_email: str | None,
                      provider: str, username: str, refresh_token: str | None,
                      app_only: bool = False, host: str, port: int, security: str,
                      folders: Sequence[str] | None = None, name: str | None = None,
                      first_sync_days: int | None = None) -> int:
    """Register an OAuth2 mailbox: with a user's refresh token (``auth_kind`` oauth2), or, for
    ``app_only``, none: the provider's client credentials or service account act for the
    mailbox's user (oauth2-app). ``mailboxes.import_mailboxes`` registers many by the same
    rules, in bulk. Returns the new id."""
    found = oauth.provider_by_name(conn, provider)
    if app_only:
        if refresh_token is not None:
            raise InvalidInput("--refresh-token-stdin: an app-only mailbox has no refresh token")
        if not found.acts_alone:
            raise InvalidInput(f"provider {provider} has no client secret or service account "
                               "key: app-only access needs one")
    else:
        _check_refresh_token(refresh_token)
    with conn.transaction():
        mailbox_id = insert_mailbox(
            conn, owner_email=owner_email, host=host, port=port, security=security,
            username=username, password_encrypted=b"", folders=folders, name=name,
            first_sync_days=first_sync_days, auth_kind="oauth2-app" if app_only else "oauth2")
        conn.execute(
            """INSERT INTO oauth_tokens (mailbox_id, provider_id, refresh_token_encrypted)
               VALUES (%s, %s, %s)""",
            (mailbox_id, found.id, box.encrypt(refresh_token) if refresh_token else None))
    return mailbox_id


def _check_refresh_token(token: str | None) -> str:
    if not token:
        raise InvalidInput("no refresh token given")
    return valid.refresh_token(token)


def set_refresh_token(conn: db.Connection, box: PasswordBox, publish: Publish, mailbox_id: int,
                      refresh_token: str, *, requested_by: str = "cli") -> Updated:
    """Replace an OAuth2 mailbox's refresh token (re-authorized): the cached access token is
    dropped, "credentials invalid" is cleared and a sync starts at once, as after a new
    password, so the person learns at once whether it works."""
    _check_refresh_token(refresh_token)
    mailbox = get_mailbox(conn, mailbox_id)
    if mailbox.auth_kind != "oauth2":
        raise ConfigError(f"mailbox {mailbox_id} does not authenticate with a user's OAuth2 "
                          f"token (its authentication is {mailbox.auth_kind})")
    with conn.transaction():
        conn.execute(
            """UPDATE oauth_tokens SET refresh_token_encrypted = %s, access_token_encrypted = NULL,
                      access_token_expires_at = NULL, access_token_issued_at = NULL,
                      last_refresh_error = NULL, updated_at = now()
                WHERE mailbox_id = %s""", (box.encrypt(refresh_token), mailbox_id))
        row = conn.execute(
            """UPDATE mailboxes SET credentials_invalid_at = NULL, updated_at = now()
                WHERE id = %s RETURNING sync_enabled""", (mailbox_id,)).fetchone()
    run_id = None
    if row is not None and row["sync_enabled"]:
        run_id = request_syncs(conn, publish, [mailbox_id], requested_by=requested_by)[0].run_id
    return Updated(mailbox_id, run_id)


# --- authorization ------------------------------------------------------------------------------

_DEFAULT_PRESET = {"google": "gmail", "microsoft": "outlook"}


def authorize(conn: db.Connection, box: PasswordBox, publish: Publish, *, provider: str,
              owner_email: str | None, show: Callable[[str], None], device: bool = False,
              preset: str | None = None, host: str | None = None, port: int | None = None,
              security: str | None = None, timeout: float = 300.0) -> Updated:
    """Let a person authorize mailferry in their browser (authorization code with PKCE and a
    loopback redirect) or on another device (``device``), learn their address, and create
    their OAuth2 mailbox, or give the existing one the new refresh token (re-authorized: it
    syncs at once). ``show`` gets what the person must open. The person never sees a token."""
    found = oauth.provider_by_name(conn, provider)
    if owner_email is not None:
        user_id_by_email(conn, owner_email)  # fail before the person is sent anywhere
    if host is None and port is None and security is None and preset is None:
        preset = _DEFAULT_PRESET.get(found.kind)
    server = server_settings(preset, host, port, security)
    grant = (oauth.authorize_device(found, box, show, timeout=timeout) if device
             else oauth.authorize_code(found, box, show, timeout=timeout))
    row = conn.execute(
        """SELECT m.id FROM mailboxes m JOIN oauth_tokens t ON t.mailbox_id = m.id
            LEFT JOIN users u ON u.id = m.owner_id
            WHERE m.auth_kind = 'oauth2' AND t.provider_id = %s AND m.removing_at IS NULL
              AND lower(m.username) = lower(%s)
              AND ((%s::text IS NULL AND m.owner_id IS NULL) OR lower(u.email) = lower(%s))
            ORDER BY m.id LIMIT 1""",
        (found.id, grant.email, owner_email, owner_email)).fetchone()
    if row is not None:
        return set_refresh_token(conn, box, publish, int(row["id"]), grant.refresh_token,
                                 requested_by="authorize")
    mailbox_id = add_oauth_mailbox(conn, box, owner_email=owner_email, provider=provider,
                                   username=grant.email, refresh_token=grant.refresh_token,
                                   host=server[0], port=server[1], security=server[2])
    return Updated(mailbox_id, None)
