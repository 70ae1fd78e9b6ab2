"""Users, mailboxes and their folders: the product's rules, callable by any entry point.

The CLI, a host application (a CRM embedding mailferry) and the tests call these same functions;
each takes its adapters as arguments (a database connection, a publish callable, a
:class:`~shared.crypto.PasswordBox`, the settings), validates its input first, and raises only
mailferry's own errors (``shared.errors``), each one clear line.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from mailferry import db, metrics, oauth, repository, slots
from mailferry.app import validation as valid
from mailferry.app.publishing import Publish, PublishMany
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.errors import ConfigError, InvalidInput, MailferryError, NoConnectionSlot, NotFound
from mailferry.imap import Folder, ImapEmailFolderManager, connector_factory
from mailferry.sync_requests import Requested, request_syncs

# --- users ------------------------------------------------------------------------------------


def add_user(conn: db.Connection, email: str, *, name: str | None = None,
             capabilities: Iterable[str] = ()) -> int:
    """Create a person who owns mailboxes and is told when their credentials stop working.

    ``email`` must be exactly one address: it becomes the To: header of notification emails.
    Returns the new user's id; an existing email (any case) is an error."""
    valid.email_address(email, "email")
    if name is not None:
        valid.display_name(name, "name")
    caps = sorted(set(capabilities))
    for cap in caps:
        valid.printable(cap, "capability")
    row = conn.execute(
        """INSERT INTO users (email, name, capabilities) VALUES (%s, %s, %s)
           ON CONFLICT DO NOTHING RETURNING id""",
        (email, name, caps),
    ).fetchone()
    if row is None:
        raise MailferryError(f"a user with email {email} already exists")
    return int(row["id"])


def list_users(conn: db.Connection) -> list[dict[str, Any]]:
    """Rows with id, email, name, enabled, capabilities, by id."""
    return conn.execute(
        "SELECT id, email, name, enabled, capabilities FROM users ORDER BY id").fetchall()


def user_id_by_email(conn: db.Connection, email: str) -> int:
    valid.text(email, "email")
    row = conn.execute("SELECT id FROM users WHERE lower(email) = lower(%s)", (email,)).fetchone()
    if row is None:
        raise NotFound(f"no user with email {email}; create it with `mailferry user add`")
    return int(row["id"])


# --- mailboxes --------------------------------------------------------------------------------


def get_mailbox(conn: db.Connection, mailbox_id: int) -> repository.Mailbox:
    """The mailbox, or NotFound (also for one being removed, and for ids no row can have)."""
    mailbox = repository.get_mailbox(conn, mailbox_id) if valid.record_id(mailbox_id) else None
    if mailbox is None:
        raise NotFound(f"no mailbox with id {mailbox_id}")
    return mailbox


def add_mailbox(conn: db.Connection, box: PasswordBox, *, owner_email: str | None, host: str,
                port: int, security: str, username: str, password: str,
                folders: Sequence[str] | None = None, name: str | None = None,
                first_sync_days: int | None = None) -> int:
    """Register a mailbox (``owner_email`` None: a system mailbox, owned by no one); its first
    sync happens at the next schedule tick. ``folders``: the folders enabled when first listed
    (None: inbox and sent). The password is stored encrypted. Returns the new id."""
    valid.password(password)
    return insert_mailbox(conn, owner_email=owner_email, host=host, port=port, security=security,
                          username=username, password_encrypted=box.encrypt(password),
                          folders=folders, name=name, first_sync_days=first_sync_days)


def insert_mailbox(conn: db.Connection, *, owner_email: str | None, host: str, port: int,
                   security: str, username: str, password_encrypted: bytes,
                   folders: Sequence[str] | None = None, name: str | None = None,
                   first_sync_days: int | None = None, auth_kind: str = "password") -> int:
    """The mailbox row, its settings checked: what every kind of credentials shares (a
    password here, OAuth2 in ``mailferry.app.oauth``, which adds its token row)."""
    valid.host(host)
    valid.port(port)
    valid.security(security)
    valid.username(username)
    if name is not None:
        valid.display_name(name)
    if first_sync_days is not None:
        valid.first_sync_days(first_sync_days)
    selection = valid.folder_names([f.strip() for f in folders if f.strip()]) if folders else None
    owner_id = user_id_by_email(conn, owner_email) if owner_email is not None else None
    row = conn.execute(
        """INSERT INTO mailboxes (owner_id, name, host, port, security, username,
                                  password_encrypted, initial_folders, first_sync_days, auth_kind)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (owner_id, name or f"{username}@{host}", host, port, security, username,
         password_encrypted, selection or None, first_sync_days, auth_kind),
    ).fetchone()
    assert row is not None
    return int(row["id"])


# --- bulk registration ------------------------------------------------------------------------


def _checked(check: Any, value: Any, what: str) -> Any:
    """A validation rule of ``valid`` as a pydantic check: its one line becomes the error."""
    try:
        return check(value, what)
    except InvalidInput as exc:
        raise ValueError(str(exc).removeprefix(f"{what}: ")) from None


class MailboxLine(BaseModel):
    """One mailbox of ``mailbox import``: the options of ``mailbox add``, by the same names
    (``owner`` or ``system``, ``host``, ``port``, ``security`` or a ``preset``, ``username``,
    ``auth``, ``password``, ``oauth_provider``, ``refresh_token``, ``folders`` as a list or
    "F1,F2", ``name``, ``first_sync_days``), checked by the same rules. An unknown field is
    refused, so a typo never silently drops a setting.

    ``auth`` is "password" (the default: ``password`` required), "oauth2" (``oauth_provider``
    and the person's ``refresh_token`` required, no password) or "oauth2-app" (``oauth_provider``
    only: the provider's client secret or service account acts for the mailbox's user). A field
    that the kind does not take is refused rather than ignored. ``preset`` ("gmail", "outlook")
    fills ``host``, ``port`` and ``security``, each overridable, as ``--preset`` does. Whether
    the provider (and the owner) exist is checked by :func:`import_mailboxes`, which has the
    database. The password and the refresh token are ``SecretStr``: no repr, log or error shows
    them.

    To add a field, declare it here with its check and map it in :meth:`row` (or
    :meth:`token_row`); the import reports its errors by line and field unchanged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: str | None = None
    system: bool = False
    preset: Literal["gmail", "outlook"] | None = None
    host: str
    port: int
    security: str
    username: str
    # Declared before the credentials: their checks read it (``info.data``).
    auth: Literal["password", "oauth2", "oauth2-app"] = "password"
    password: SecretStr | None = Field(default=None, validate_default=True)
    oauth_provider: str | None = Field(default=None, validate_default=True)
    refresh_token: SecretStr | None = Field(default=None, validate_default=True)
    folders: list[str] | None = None
    name: str | None = None
    first_sync_days: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """``preset`` fills what the line leaves out (absent or null), as ``--preset`` does."""
        preset = data.get("preset") if isinstance(data, Mapping) else None
        if isinstance(preset, str) and preset in oauth.MAILBOX_PRESETS:
            server = dict(zip(("host", "port", "security"),
                              oauth.MAILBOX_PRESETS[preset], strict=True))
            data = {**data, **{k: v for k, v in server.items() if data.get(k) is None}}
        return data

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        return None if value is None else _checked(valid.email_address, value, "owner")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return str(_checked(valid.host, value, "host"))

    @field_validator("port", "first_sync_days", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true is no number, though pydantic would take it
            raise ValueError("must be a number")
        return value

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        return int(_checked(valid.port, value, "port"))

    @field_validator("security")
    @classmethod
    def _security(cls, value: str) -> str:
        return str(_checked(valid.security, value, "security"))

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        return str(_checked(valid.username, value, "username"))

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        auth = info.data.get("auth")  # absent when "auth" itself is wrong: that error suffices
        if value is None:
            if auth == "password":
                raise ValueError("missing")
            return None
        if auth in ("oauth2", "oauth2-app"):
            raise ValueError(f'an "auth": "{auth}" mailbox signs in with OAuth2, not a password')
        _checked(valid.password, value.get_secret_value(), "password")
        return value

    @field_validator("oauth_provider")
    @classmethod
    def _oauth_provider(cls, value: str | None, info: ValidationInfo) -> str | None:
        auth = info.data.get("auth")
        if value is None:
            if auth in ("oauth2", "oauth2-app"):
                raise ValueError(f'missing: an "auth": "{auth}" mailbox needs its provider\'s '
                                 "name (oauth provider list)")
            return None
        if auth == "password":
            raise ValueError('only an "auth": "oauth2" or "oauth2-app" mailbox has a provider')
        if not value:
            raise ValueError("must not be empty")
        return str(_checked(valid.printable, value, "oauth_provider"))

    @field_validator("refresh_token")
    @classmethod
    def _refresh_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        auth = info.data.get("auth")
        if value is None:
            if auth == "oauth2":
                raise ValueError('missing: an "auth": "oauth2" mailbox needs the person\'s '
                                 "refresh token")
            return None
        if auth == "oauth2-app":
            raise ValueError('an "auth": "oauth2-app" mailbox has no refresh token')
        if auth == "password":
            raise ValueError('only an "auth": "oauth2" mailbox has a refresh token')
        _checked(valid.refresh_token, value.get_secret_value(), "refresh_token")
        return value

    @field_validator("folders", mode="before")
    @classmethod
    def _folders_split(cls, value: Any) -> Any:
        return value.split(",") if isinstance(value, str) else value  # as --folders F1,F2

    @field_validator("folders")
    @classmethod
    def _folders(cls, value: list[str] | None) -> list[str] | None:
        names = [f.strip() for f in value or () if f.strip()]
        return _checked(valid.folder_names, names, "folders") or None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _checked(valid.display_name, value, "name")

    @field_validator("first_sync_days")
    @classmethod
    def _first_sync_days(cls, value: int | None) -> int | None:
        return None if value is None else _checked(valid.first_sync_days, value, "first_sync_days")

    @model_validator(mode="after")
    def _one_owner(self) -> MailboxLine:
        if (self.owner is not None) == self.system:
            raise ValueError('give exactly one of "owner" (a user\'s email) or "system": true')
        return self

    def row(self, owner_id: int | None, box: PasswordBox) -> tuple[Any, ...]:
        """The values of ``_INSERT_MAILBOX``, the password encrypted (an OAuth2 mailbox has
        none: an empty value, as ``add_oauth_mailbox`` stores)."""
        password = (box.encrypt(self.password.get_secret_value()) if self.password is not None
                    else b"")
        return (owner_id, self.name or f"{self.username}@{self.host}", self.host, self.port,
                self.security, self.username, password, self.folders, self.first_sync_days,
                self.auth)

    def token_row(self, mailbox_id: int, provider_id: int,
                  box: PasswordBox) -> tuple[int, int, bytes | None]:
        """The values of ``_INSERT_TOKEN`` (OAuth2 only), the refresh token encrypted."""
        token = self.refresh_token
        return (mailbox_id, provider_id,
                box.encrypt(token.get_secret_value()) if token is not None else None)


_INSERT_MAILBOX = """
INSERT INTO mailboxes (owner_id, name, host, port, security, username, password_encrypted,
                       initial_folders, first_sync_days, auth_kind)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"""

_INSERT_TOKEN = """
INSERT INTO oauth_tokens (mailbox_id, provider_id, refresh_token_encrypted) VALUES (%s, %s, %s)"""


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based, as an editor counts
    field: str | None  # None: the line as a whole
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: " + (f"{self.field}: " if self.field else "") + self.message


class ImportRefused(InvalidInput):
    """Some lines of an import are wrong; nothing was written. ``errors`` names each one (line,
    field, what is wrong), never a value: a line may hold a password."""

    def __init__(self, errors: Sequence[LineError], shown: int = 10) -> None:
        self.errors = list(errors)
        more = len(self.errors) - shown
        super().__init__(f"{len(self.errors)} error(s), nothing imported: "
                         + "; ".join(map(str, self.errors[:shown]))
                         + (f"; and {more} more" if more > 0 else ""))


def parse_mailbox_lines(
        lines: Iterable[str | Mapping[str, Any]]) -> list[tuple[int, MailboxLine]]:
    """Every line checked (blank ones skipped); all the errors at once in ``ImportRefused``.
    A line is a JSON object, or already a mapping (a host application's dicts). Returns
    (line number, mailbox) pairs."""
    parsed: list[tuple[int, MailboxLine]] = []
    errors: list[LineError] = []
    for number, line in enumerate(lines, start=1):
        if isinstance(line, str):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as exc:  # its message gives a position, never the text
                errors.append(LineError(number, None, f"not valid JSON ({exc})"))
                continue
        else:
            data = line
        if not isinstance(data, Mapping):
            errors.append(LineError(number, None, "must be a JSON object {...}"))
            continue
        try:
            parsed.append((number, MailboxLine.model_validate(data)))
        except pydantic.ValidationError as exc:
            errors += [_line_error(number, e) for e in exc.errors(
                include_url=False, include_context=False, include_input=False)]
    if errors:
        raise ImportRefused(errors)
    return parsed


def _line_error(number: int, error: Any) -> LineError:
    field = ".".join(str(part) for part in error["loc"]) or None
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = f"unknown field (known: {', '.join(MailboxLine.model_fields)})"
    elif error["type"] == "missing":
        message = "missing" + (' (or a "preset": gmail, outlook)'
                               if field in ("host", "port", "security") else "")
    return LineError(number, field, message[:1].lower() + message[1:])


def import_mailboxes(conn: db.Connection, box: PasswordBox,
                     lines: Iterable[str | Mapping[str, Any]]) -> list[int]:
    """Register many mailboxes at once (``mailferry mailbox import``): one per line, each as
    :func:`add_mailbox` would, or ``app.oauth.add_oauth_mailbox`` for an OAuth2 line (a line
    repeating a registered mailbox registers it again, as ``mailbox add`` run twice does). Every
    line is checked first, owners and OAuth2 providers included (one query each); one wrong
    line writes nothing (``ImportRefused`` names every wrong line and field). Then all rows go
    in one transaction, in pipelined batches: the mailboxes, then the OAuth2 lines' token rows.
    1,000 mailboxes take well under a second (the Fernet encryption of each password or refresh
    token included). Returns the new ids, in the lines' order."""
    entries = parse_mailbox_lines(lines)
    owners = sorted({e.owner.lower() for _, e in entries if e.owner is not None})
    known = {r["email"]: int(r["id"]) for r in conn.execute(
        "SELECT id, lower(email) AS email FROM users WHERE lower(email) = ANY(%s)",
        (owners,)).fetchall()} if owners else {}
    providers = oauth.providers_by_name(
        conn, [e.oauth_provider for _, e in entries if e.oauth_provider is not None])
    errors: list[LineError] = []
    for number, entry in entries:
        if entry.owner is not None and entry.owner.lower() not in known:
            errors.append(LineError(number, "owner", f"no user with email {entry.owner}; "
                                                     "create it with `mailferry user add`"))
        if entry.oauth_provider is None:
            continue
        provider = providers.get(entry.oauth_provider.lower())
        if provider is None:
            errors.append(LineError(number, "oauth_provider",
                                    f"no OAuth2 provider named {entry.oauth_provider!r}; add it "
                                    "with `mailferry oauth provider add`"))
        elif entry.auth == "oauth2-app" and not provider.acts_alone:
            errors.append(LineError(number, "oauth_provider",
                                    f"provider {provider.name} has no client secret or service "
                                    "account key: app-only access needs one"))
    if errors:
        raise ImportRefused(errors)
    rows = [e.row(known[e.owner.lower()] if e.owner else None, box) for _, e in entries]
    if not rows:
        return []
    ids: list[int] = []
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(_INSERT_MAILBOX, rows, returning=True)
        while True:
            row = cur.fetchone()
            assert row is not None
            ids.append(int(row["id"]))
            if not cur.nextset():
                break
        tokens = [e.token_row(mailbox_id, providers[e.oauth_provider.lower()].id, box)
                  for mailbox_id, (_, e) in zip(ids, entries, strict=True)
                  if e.oauth_provider is not None]
        if tokens:
            cur.executemany(_INSERT_TOKEN, tokens)
    return ids


@dataclass(frozen=True)
class MailboxChanges:
    """What to change; None leaves a setting as it is."""

    host: str | None = None
    port: int | None = None
    security: str | None = None
    username: str | None = None
    password: str | None = None
    name: str | None = None
    sync_enabled: bool | None = None
    first_sync_days: int | None = None
    push: bool | None = None  # watched for changes by a scheduler (README "Push")

    #: Settings that decide whether mailferry can log in at all.
    CONNECTION = ("host", "port", "security", "username", "password")

    def validate(self) -> None:
        if self.host is not None:
            valid.host(self.host)
        if self.port is not None:
            valid.port(self.port)
        if self.security is not None:
            valid.security(self.security)
        if self.username is not None:
            valid.username(self.username)
        if self.password is not None:
            valid.password(self.password)
        if self.name is not None:
            valid.display_name(self.name)
        if self.first_sync_days is not None:
            valid.first_sync_days(self.first_sync_days)

    @property
    def reconnects(self) -> bool:
        return any(getattr(self, field) is not None for field in self.CONNECTION)


@dataclass(frozen=True)
class Updated:
    id: int
    run_id: uuid.UUID | None  # the sync started because the connection settings changed


def update_mailbox(conn: db.Connection, box: PasswordBox | None, publish: Publish,
                   mailbox_id: int, changes: MailboxChanges, *,
                   requested_by: str = "cli") -> Updated:
    """Change a mailbox's settings.

    New connection settings (host, port, security, username, password) clear the "credentials
    invalid" state and start a sync at once (if its sync is enabled): the person who fixed them
    learns at once whether they work. ``box`` is needed only for a new password."""
    changes.validate()
    mailbox = get_mailbox(conn, mailbox_id)
    if changes.password is not None and mailbox.auth_kind != "password":
        raise ConfigError(f"mailbox {mailbox_id} signs in with OAuth2, not a password: give it a "
                          f"new token with `mailferry mailbox update {mailbox_id} "
                          "--refresh-token-stdin` or `mailferry oauth authorize`")
    columns: dict[str, Any] = {
        "host": changes.host, "port": changes.port, "security": changes.security,
        "username": changes.username, "name": changes.name,
        "sync_enabled": changes.sync_enabled, "first_sync_days": changes.first_sync_days,
        "push": changes.push}
    if changes.password is not None:
        if box is None:
            raise ConfigError("a new password needs the encryption key (MAILFERRY_SECRET_KEY)")
        columns["password_encrypted"] = box.encrypt(changes.password)
    columns = {k: v for k, v in columns.items() if v is not None}
    if not columns:
        raise ConfigError("nothing to change")
    reconnect = changes.reconnects
    assignments = ", ".join(f"{column} = %({column})s" for column in columns)
    row = conn.execute(
        f"""UPDATE mailboxes SET {assignments}, updated_at = now(),
                   credentials_invalid_at = CASE WHEN %(reconnect)s THEN NULL
                                                 ELSE credentials_invalid_at END
             WHERE id = %(id)s AND removing_at IS NULL RETURNING sync_enabled""",
        {**columns, "reconnect": reconnect, "id": mailbox_id},
    ).fetchone()
    if row is None:
        raise NotFound(f"no mailbox with id {mailbox_id}")
    run_id = None
    if reconnect and row["sync_enabled"]:
        run_id = request_syncs(conn, publish, [mailbox_id], requested_by=requested_by)[0].run_id
    return Updated(mailbox_id, run_id)


_MAILBOX_LIST = """
SELECT m.id, m.name, u.email AS owner, m.host, m.port, m.security, m.username, m.sync_enabled,
       m.last_sync_at, m.last_sync_status, m.last_error,
       m.credentials_invalid_at IS NOT NULL AS credentials_invalid,
       m.auth_kind, t.access_token_expires_at AS token_expires_at,
       t.last_refreshed_at AS token_refreshed_at,
       CASE WHEN m.throttled_until > now() THEN m.throttled_until END AS throttled_until,
       (SELECT count(*) FROM folders f WHERE f.mailbox_id = m.id AND f.sync_enabled)
           AS folders_enabled,
       (SELECT count(*) FROM folders f WHERE f.mailbox_id = m.id AND f.sync_enabled
                                         AND f.backfill_below IS NOT NULL) AS folders_backfilling,
       (SELECT count(*) FROM messages g WHERE g.mailbox_id = m.id) AS messages,
       m.folder_report, m.push,
       CASE WHEN w.holder IS NOT NULL AND w.lease_expires_at > now() THEN w.state ELSE 'off' END
           AS watch,
       CASE WHEN w.lease_expires_at > now() THEN w.holder END AS watch_holder,
       CASE WHEN w.holder IS NOT NULL AND w.lease_expires_at > now() THEN w.error END
           AS watch_error,
       -- an active run whose attempt found no connection slot free (runs.waiting), until
       -- its command is due back
       CASE WHEN m.throttled_until > now() THEN
           (SELECT r.error FROM sync_runs r WHERE r.mailbox_id = m.id
               AND r.status IN ('queued', 'running') AND r.error_kind = 'throttled') END
           AS waiting
  FROM mailboxes m LEFT JOIN users u ON u.id = m.owner_id
  LEFT JOIN mailbox_watches w ON w.mailbox_id = m.id
  LEFT JOIN oauth_tokens t ON t.mailbox_id = m.id
 ORDER BY m.id"""


def list_mailboxes(conn: db.Connection) -> list[dict[str, Any]]:
    """Mailboxes with their sync state (never their passwords), and ``folder_notes``: what
    became of their folder selection (:func:`selection_notes`, joined by "; ", or None)."""
    rows = conn.execute(_MAILBOX_LIST).fetchall()
    for row in rows:
        row["folder_notes"] = "; ".join(selection_notes(row["folder_report"])) or None
    return rows


def selection_notes(report: dict[str, Any] | None) -> list[str]:
    """What became of the --folders selection: "Sent -> INBOX.Sent" where the server's name
    differs, and the names that select nothing (unmatched, or an enabled folder vanished)."""
    report = report or {}
    notes = [f"{s['name']} -> {s['resolved_as']}" for s in report.get("selection") or ()
             if s.get("resolved_as") and s["resolved_as"] != s["name"]]
    notes += [f"no folder {name!r} on the server" for name in report.get("unmatched") or ()]
    notes += [f"enabled folder {name!r} vanished from the server"
              for name in report.get("vanished") or ()]
    return notes


def folder_report(conn: db.Connection, mailbox_id: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT folder_report FROM mailboxes WHERE id = %s",
                       (mailbox_id,)).fetchone()
    return row["folder_report"] if row else None


# --- check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """A successful login: the "check connection" button's answer."""

    server: str
    security: str
    username: str
    seconds: float
    capabilities: list[str]
    tree: list[Folder]

    def as_dict(self) -> dict[str, Any]:
        """``folders`` flat (``name`` the full path), ``tree`` nested (``name`` the last part,
        ``path`` the full name, ``children``)."""
        folders = [f for root in self.tree for f in root.walk()]
        return {
            "ok": True,
            "server": self.server,
            "security": self.security,
            "seconds": self.seconds,
            "capabilities": self.capabilities,
            "folders": [{"name": f.path, "raw_name": f.raw_name, "delimiter": f.delimiter,
                         "flags": list(f.flags), "type": f.type, "selectable": f.selectable,
                         "uidvalidity": None} for f in folders],
            "tree": [root.to_dict() for root in self.tree],
        }


def check_mailbox(conn: db.Connection, box: PasswordBox, settings: Settings,
                  mailbox_id: int) -> CheckResult:
    """Log in now and list the folder tree and the server's capabilities. A refused login, an
    unreachable server or a bad certificate raise ``ImapError`` (``kind`` says which). The
    connection counts in the account's connection budget like a sync's (``shared/slots.py``):
    ``NoConnectionSlot`` when every slot is taken."""
    mailbox = get_mailbox(conn, mailbox_id)
    valid.host(mailbox.host, f"mailbox {mailbox_id}'s stored host")  # stored before validation
    config = mailbox.imap_config(box, timeout=settings.imap_timeout,
                                 ca_file=settings.imap_ca_file,
                                 allow_private_networks=settings.allow_private_networks,
                                 limits=settings.imap_limits())
    started = time.monotonic()
    auth = oauth.authenticator(mailbox, conn, box, timeout=settings.imap_timeout)
    slot = slots.claim(conn, settings, holder=f"check@{socket.gethostname()}:{os.getpid()}",
                       mailbox_id=mailbox_id, host=mailbox.host, username=mailbox.username,
                       purpose=slots.Purpose.SYNC, seconds=settings.lease_seconds)
    if slot is None:
        raise NoConnectionSlot(slots.refused(mailbox.host, mailbox.username,
                                             slots.Purpose.SYNC, settings))
    try:
        with connector_factory.create_imap_connector(config, auth) as connector:
            tree = ImapEmailFolderManager(connector).get_folders(None, recursive=True)
            capabilities = sorted(connector.capabilities())
    finally:
        slots.release(conn, slot)
    return CheckResult(server=config.address, security=config.security, username=config.username,
                       seconds=round(time.monotonic() - started, 3), capabilities=capabilities,
                       tree=list(tree))


# --- folders ----------------------------------------------------------------------------------


def set_folders(conn: db.Connection, publish: Publish, mailbox_id: int, *,
                enable: Sequence[str] = (), disable: Sequence[str] = (),
                requested_by: str = "cli") -> bool:
    """Enable or disable folders' sync, by name as shown or raw name; all or none change.

    A change queues a folder sync at once (SyncFolders: the folder list, not the mail), as users
    expect after changing a mailbox's sync settings. Returns whether anything was asked."""
    get_mailbox(conn, mailbox_id)
    valid.folder_names([*enable, *disable])
    with conn.transaction():
        for names, value in ((enable, True), (disable, False)):
            for folder in names:
                row = conn.execute(
                    """UPDATE folders SET sync_enabled = %s
                        WHERE mailbox_id = %s AND (name = %s OR raw_name = %s)
                          AND (selectable OR NOT %s)
                    RETURNING id""",
                    (value, mailbox_id, folder, folder, value),
                ).fetchone()
                if row is None:
                    known = conn.execute(
                        "SELECT name FROM folders WHERE mailbox_id = %s AND selectable ORDER BY name",
                        (mailbox_id,),
                    ).fetchall()
                    raise NotFound(
                        f"mailbox {mailbox_id} has no selectable folder {folder!r}"
                        + (f"; known: {', '.join(r['name'] for r in known)}" if known else
                           "; no folders known yet: run `mailferry sync --mailbox "
                           f"{mailbox_id} --wait` first")
                    )
    if not (enable or disable):
        return False
    request_syncs(conn, publish, [mailbox_id], requested_by=requested_by, folders_only=True)
    return True


def list_folders(conn: db.Connection, mailbox_id: int) -> list[dict[str, Any]]:
    """The mailbox's folders with their sync state and how many messages each holds."""
    get_mailbox(conn, mailbox_id)
    return conn.execute(
        """SELECT f.name, f.raw_name, f.delimiter, f.type, f.selectable, f.sync_enabled,
                  f.uidvalidity, f.last_uid, f.last_synced_at, f.gone_at, f.last_error,
                  (SELECT count(*) FROM message_folders mf WHERE mf.folder_id = f.id
                      AND mf.expunged_at IS NULL) AS messages
             FROM folders f WHERE f.mailbox_id = %s ORDER BY f.name""",
        (mailbox_id,),
    ).fetchall()


# --- syncs ------------------------------------------------------------------------------------


def request_sync(conn: db.Connection, publish: Publish, mailbox_ids: Sequence[int] | None, *,
                 force: bool = False, requested_by: str = "cli",
                 wait_behind_folder_runs: float = 30.0, parallel: int = 1,
                 publish_many: PublishMany | None = None,
                 ) -> list[Requested]:
    """Sync these mailboxes now (None: every enabled one); the manual counterpart of the
    schedule. A mailbox with a run already queued or running gets that run back. A disabled
    mailbox, or one with invalid credentials, is synced only with ``force``. ``parallel``:
    commands published at once, with a ``publish`` that can (``app.publishing.PublisherPool``);
    ``publish_many``: whole batches with one wait for their confirms (``request_syncs``)."""
    if mailbox_ids is None:
        ids = [r["id"] for r in conn.execute(
            """SELECT id FROM mailboxes WHERE (sync_enabled OR %s) AND removing_at IS NULL
                ORDER BY id""", (force,)).fetchall()]
    else:
        ids = list(dict.fromkeys(mailbox_ids))
        for mailbox_id in ids:
            mailbox = get_mailbox(conn, mailbox_id)
            if not mailbox.sync_enabled and not force:
                raise ConfigError(f"mailbox {mailbox_id} has sync disabled; use --force")
    return request_syncs(conn, publish, ids, requested_by=requested_by, force=force,
                         wait_behind_folder_runs=wait_behind_folder_runs, parallel=parallel,
                         publish_many=publish_many)


def run_states(conn: db.Connection, run_ids: Sequence[uuid.UUID]) -> list[dict[str, Any]]:
    """The runs' states by mailbox, with the progress of their current attempt (its fencing
    token): folders_total, messages_found, folders_done, messages_done."""
    return conn.execute(
        """SELECT r.id AS run_id, r.mailbox_id, r.status, r.messages_stored, r.error_kind,
                  r.error, r.started_at, r.finished_at,
                  r.folders_total, r.messages_found,
                  (SELECT count(*) FROM sync_folders f WHERE f.run_id = r.id
                      AND f.lease_token = r.progress_token AND f.completed) AS folders_done,
                  (SELECT coalesce(sum(b.messages), 0) FROM sync_batches b
                    WHERE b.run_id = r.id AND b.lease_token = r.progress_token
                  ) AS messages_done
             FROM sync_runs r WHERE r.id = ANY(%s) ORDER BY r.mailbox_id""",
        (list(run_ids),),
    ).fetchall()


def folder_reports(conn: db.Connection, mailbox_ids: Sequence[int]) -> dict[int, Any]:
    return {r["id"]: r["folder_report"] for r in conn.execute(
        "SELECT id, folder_report FROM mailboxes WHERE id = ANY(%s)",
        (list(mailbox_ids),)).fetchall()}


# --- messages ---------------------------------------------------------------------------------


def list_messages(conn: db.Connection, mailbox_id: int,
                  folder: str | None = None) -> list[dict[str, Any]]:
    """One entry per message and folder it is in (expunged ones left out). ``parsed`` false:
    stored (``raw_message`` reads it) but not parsed yet, so its parsed fields are null or
    empty for now (shared/parsing.py); they appear as soon as the parse step filled them."""
    get_mailbox(conn, mailbox_id)
    if folder is not None:
        valid.text(folder, "folder")
    return conn.execute(
        """SELECT g.id, f.name AS folder, mf.uid, mf.uidvalidity, g.message_id, g.subject,
                  g.from_addr AS "from", g.to_addrs AS "to", g.sent_at AS date, mf.seen,
                  mf.flags, COALESCE(g.size, mf.size) AS size, encode(g.sha256, 'hex') AS sha256,
                  mf.internal_date, cardinality(g.parse_errors) AS parse_errors,
                  mf.skipped_reason, (g.id IS NULL OR g.parsed_at IS NOT NULL) AS parsed
             FROM message_folders mf
             JOIN folders f ON f.id = mf.folder_id
             LEFT JOIN messages g ON g.id = mf.message_id
            WHERE f.mailbox_id = %s AND mf.expunged_at IS NULL
              AND (%s::text IS NULL OR f.name = %s OR f.raw_name = %s)
            ORDER BY f.name, mf.uid""",
        (mailbox_id, folder, folder, folder),
    ).fetchall()


def raw_message(conn: db.Connection, message_id: int) -> bytes:
    """The message's RFC 822 bytes exactly as the server sent them."""
    row = conn.execute(
        """SELECT r.data FROM messages g JOIN raw_messages r ON r.sha256 = g.sha256
            WHERE g.id = %s""",
        (message_id,),
    ).fetchone() if valid.record_id(message_id) else None
    if row is None:
        raise NotFound(f"no message with id {message_id}")
    return bytes(row["data"])


# --- keys -------------------------------------------------------------------------------------


def rotate_keys(conn: db.Connection, box: PasswordBox) -> int:
    """Re-encrypt every stored password with the box's first key, and every OAuth2 secret
    (client secrets, keys, tokens); returns how many passwords. A mailbox being removed has no
    password left to rotate, nor has an OAuth2 mailbox."""
    with conn.transaction():
        rows = conn.execute(
            """SELECT id, password_encrypted FROM mailboxes WHERE removing_at IS NULL
                  AND auth_kind = 'password' ORDER BY id FOR UPDATE""").fetchall()
        for row in rows:
            conn.execute("UPDATE mailboxes SET password_encrypted = %s WHERE id = %s",
                         (box.rotate(row["password_encrypted"]), row["id"]))
        oauth.rotate_secrets(conn, box)
    return len(rows)


# --- status -----------------------------------------------------------------------------------


def status(conn: db.Connection, settings: Settings) -> dict[str, Any]:
    """Counts and the ten latest runs from PostgreSQL, queue depths from RabbitMQ (an
    unreachable broker is reported in ``queues``, not raised)."""
    counts = conn.execute(
        """SELECT (SELECT count(*) FROM users) AS users,
                  (SELECT count(*) FROM mailboxes) AS mailboxes,
                  (SELECT count(*) FROM mailboxes WHERE credentials_invalid_at IS NOT NULL)
                      AS mailboxes_with_invalid_credentials,
                  (SELECT count(*) FROM messages) AS messages,
                  (SELECT count(*) FROM raw_messages) AS raw_messages,
                  (SELECT COALESCE(sum(size), 0)::bigint FROM raw_messages) AS raw_bytes"""
    ).fetchone()
    runs = conn.execute(
        """SELECT status, count(*) AS n FROM sync_runs GROUP BY status ORDER BY status"""
    ).fetchall()
    recent = conn.execute(
        """SELECT id AS run_id, mailbox_id, status, requested_by, requested_at, finished_at,
                  messages_stored, error FROM sync_runs ORDER BY requested_at DESC LIMIT 10"""
    ).fetchall()
    tokens = conn.execute(
        """SELECT m.id AS mailbox_id, m.auth_kind, p.name AS provider,
                  t.access_token_expires_at AS token_expires_at,
                  t.last_refreshed_at AS token_refreshed_at, t.last_refresh_error
             FROM oauth_tokens t JOIN mailboxes m ON m.id = t.mailbox_id
             JOIN oauth_providers p ON p.id = t.provider_id ORDER BY m.id"""
    ).fetchall()
    watches = conn.execute(
        """SELECT CASE WHEN w.holder IS NOT NULL AND w.lease_expires_at > now() THEN w.state
                       ELSE 'off' END AS state,
                  CASE WHEN w.lease_expires_at > now() THEN w.holder END AS holder,
                  count(*) AS n
             FROM mailboxes m LEFT JOIN mailbox_watches w ON w.mailbox_id = m.id
            GROUP BY 1, 2 ORDER BY 1, 2""").fetchall()
    slots = conn.execute(
        """SELECT purpose, count(*) AS n FROM imap_connection_slots WHERE expires_at > now()
            GROUP BY purpose""").fetchall()
    by_state: dict[str, int] = {}
    by_holder: dict[str, int] = {}
    for row in watches:
        by_state[row["state"]] = by_state.get(row["state"], 0) + row["n"]
        if row["holder"] is not None:
            by_holder[row["holder"]] = by_holder.get(row["holder"], 0) + row["n"]
    return {**(counts or {}), "runs": {r["status"]: r["n"] for r in runs},
            "watches": by_state, "watch_holders": by_holder, "push": settings.push,
            "connection_slots": {r["purpose"]: r["n"] for r in slots},
            "sync_lag": metrics.sync_lag(conn), "recent_runs": recent, "oauth_mailboxes": tokens,
            "queues": queue_depths(settings)}


def queue_depths(settings: Settings) -> dict[str, int | str]:
    from mailferry import broker, topology

    depths: dict[str, int | str] = {}
    conn = broker.connect(settings.broker_url)
    try:
        channel = conn.channel()
        for work in topology.WORK_QUEUES:
            for name in (work.name, work.dead_letter_name):
                try:
                    depths[name] = channel.queue_declare(name, passive=True).message_count
                except Exception:
                    channel = conn.channel()
                    depths[name] = "not declared"
    except Exception as exc:
        depths["error"] = f"RabbitMQ unreachable: {exc}"
    finally:
        conn.release()
    return depths

