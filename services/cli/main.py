"""The ``mailferry`` command: operator CLI and service entry points.

A stable interface other tools script: names, JSON shapes and exit codes are kept.

Exit codes: 0 success; 1 what was asked failed (a refused login, a failed sync); 2 bad usage or
configuration; 3 timed out (``sync --wait``); 4 a dependency is unavailable (PostgreSQL, RabbitMQ).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, NoReturn

import click
import psycopg
import structlog

from mailferry import app, db
from mailferry.app import dead_letters, publishing, removal, validation
from mailferry.app import oauth as app_oauth
from mailferry.app.mailboxes import folder_report, folder_reports
from mailferry.config import Settings, load_settings
from mailferry.crypto import PasswordBox, generate_key
from mailferry.errors import (
    BrokerUnavailable,
    ConfigError,
    DatabaseUnavailable,
    ImapError,
    InvalidInput,
    MailferryError,
    NoConnectionSlot,
    NotFound,
    TransientError,
)
from mailferry.imap import Folder
from mailferry.logging import configure_logging, current_stderr
from mailferry.services.cli import oauth as oauth_cli
from mailferry.services.cli.changes import changes

EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 1, 2, 3, 4
_JSON = click.option("--json", "as_json", is_flag=True,
                     help="print JSON with stable keys (for scripts) instead of a table")


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"mailferry: error: {_visible(message)}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except Exception as exc:  # pydantic's ValidationError: say which variable is wrong
        _die(f"invalid configuration: {' '.join(str(exc).split())}", EXIT_USAGE)


def _conn(settings: Settings) -> db.Connection:
    return db.connect(settings.database_url, autocommit=True)


def _json(value: Any) -> None:
    click.echo(json.dumps(value, default=_jsonable, ensure_ascii=False))


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, list | tuple):
        return ",".join(map(_cell, value))
    text = _visible(str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _visible(text: str) -> str:
    """Control characters shown escaped: names and subjects come from mail servers and users,
    and must not move the cursor or forge lines in an operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Group(click.Group):
    """Turns mailferry's own errors into one clear line and a stable exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (DatabaseUnavailable, BrokerUnavailable) as exc:
            _die(str(exc), EXIT_UNAVAILABLE)
        except (ConfigError, NotFound) as exc:
            _die(str(exc), EXIT_USAGE)
        except psycopg.DataError as exc:  # a value PostgreSQL cannot hold (NUL, out of range)
            _die(f"invalid value: {exc.diag.message_primary or exc}", EXIT_USAGE)
        except TransientError as exc:
            _die(str(exc), EXIT_UNAVAILABLE)
        except MailferryError as exc:
            _die(str(exc), EXIT_FAILED)


@click.group(cls=_Group)
def cli() -> None:
    """mailferry keeps IMAP mailboxes synchronized into PostgreSQL through RabbitMQ.

    Configuration comes from MAILFERRY_* environment variables (see the README).

    \b
    A first session:
      mailferry keys generate                # then export MAILFERRY_SECRET_KEY=...
      mailferry up &                         # the four services on this machine
      mailferry user add --email ann@example.com
      printf '%s\\n' "$PW" | mailferry mailbox add --owner ann@example.com \\
          --host imap.example.com --port 993 --security ssl --username ann --password-stdin
      mailferry mailbox check 1              # log in now, print the folder tree
      mailferry sync --mailbox 1 --wait      # sync now, with a progress bar
      mailferry messages search --mailbox 1 'from:bob invoice'

    \b
    Exit codes: 0 done; 1 what was asked failed (a refused login, a failed sync);
    2 bad usage or an unknown id; 3 timed out; 4 PostgreSQL or RabbitMQ unavailable.
    """


# --- db and keys ------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The PostgreSQL schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations (safe while services run or start; waits up to 2 minutes for
    PostgreSQL to come up)."""
    settings = _settings()
    applied = db.migrate_when_ready(settings.database_url)
    click.echo(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else
                                                          "; the schema is up to date"))


@cli.group("keys")
def keys_group() -> None:
    """Encryption keys for stored passwords."""


@keys_group.command("generate")
def keys_generate() -> None:
    """Print a new key for MAILFERRY_SECRET_KEY."""
    click.echo(generate_key())


@keys_group.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored password with the first key of MAILFERRY_SECRET_KEY.

    To rotate: put the new key first (NEW,OLD), restart the services, run this, then drop OLD.
    """
    settings = _settings()
    box = PasswordBox(settings.secret_key)
    _json({"rotated": app.rotate_keys(_conn(settings), box)})


# --- users ------------------------------------------------------------------------------------


@cli.group("user")
def user_group() -> None:
    """People who own mailboxes and receive notifications."""


@user_group.command("add")
@click.option("--email", required=True,
              help="their address, exactly one (notification emails go there)")
@click.option("--name", help="a display name")
@click.option("--capability", "capabilities", multiple=True,
              help="e.g. imap_sync_origin_credential_notifications (repeatable)")
def user_add(email: str, name: str | None, capabilities: tuple[str, ...]) -> None:
    """Create a user; prints {"id": ...}."""
    validation.email_address(email, "--email")  # before any configuration is read
    _json({"id": app.add_user(_conn(_settings()), email, name=name, capabilities=capabilities)})


@user_group.command("list")
@_JSON
def user_list(as_json: bool) -> None:
    """List users."""
    rows = app.list_users(_conn(_settings()))
    if as_json:
        _json(rows)
    else:
        _table(rows, ["id", "email", "name", "enabled", "capabilities"])


@user_group.command("remove")
@click.argument("email")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--batch", default=removal.DEFAULT_BATCH, show_default=True,
              type=click.IntRange(1, 100000), help="rows deleted per transaction")
def user_remove(email: str, yes: bool, batch: int) -> None:
    """Remove a user and every mailbox they own, with all their mail; prints what was removed
    as JSON. System mailboxes (owned by no one) stay. Safe to run again after an interruption."""
    conn = _conn(_settings())
    summary = removal.user_summary(conn, email)
    messages = sum(m["messages"] for m in summary["mailboxes"])
    _confirm(f"Remove user {summary['email']}, their {len(summary['mailboxes'])} mailbox(es) "
             f"and {messages} stored message(s)?", yes)
    _json(app.remove_user(conn, email, batch=batch))


def _confirm(question: str, yes: bool) -> None:
    """Ask on a terminal; without one, only --yes may go ahead (a script must say so)."""
    if yes:
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.UsageError("not on a terminal: add --yes to confirm")
    if not click.confirm(_visible(question), default=False):
        _die("nothing removed", EXIT_FAILED)


# --- mailboxes --------------------------------------------------------------------------------


@cli.group("mailbox")
def mailbox_group() -> None:
    """IMAP mailboxes to synchronize."""


def _read_password() -> str:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.UsageError("no password on standard input")
    return password


@mailbox_group.command("add")
@click.option("--owner", help="email of the owning user")
@click.option("--system", is_flag=True, help="a system mailbox, owned by no one")
@click.option("--host", help="the IMAP server's host name or IP address")
@click.option("--port", type=click.IntRange(1, 65535), help="993 for ssl, 143 for starttls or none")
@click.option("--security", type=click.Choice(["ssl", "starttls", "none"]),
              help="ssl: TLS from the start; starttls: upgraded, never downgraded; none: clear text")
@click.option("--preset", type=click.Choice(sorted(oauth_cli.MAILBOX_PRESETS)),
              help="host, port and security of a provider: imap.gmail.com or outlook.office365.com")
@click.option("--username", required=True, help="the IMAP login (for OAuth2: the email address)")
@click.option("--auth", "auth_kind", type=click.Choice(["password", "oauth2", "oauth2-app"]),
              default="password", show_default=True,
              help="a password, a user's OAuth2 refresh token, or app-only OAuth2 access")
@click.option("--password-stdin", is_flag=True,
              help="read the password from standard input (never from the command line)")
@click.option("--oauth-provider", help="the OAuth2 provider's name (oauth provider list)")
@click.option("--refresh-token-stdin", is_flag=True,
              help="read the OAuth2 refresh token from standard input")
@click.option("--folders", help="comma-separated folders to sync (default: inbox and sent)")
@click.option("--name", help="a display name (default: username@host)")
@click.option("--first-sync-days", type=click.IntRange(1, validation.MAX_FIRST_SYNC_DAYS),
              help="the first sync loads this many days (default MAILFERRY_FIRST_SYNC_DAYS)")
def mailbox_add(owner: str | None, system: bool, host: str | None, port: int | None,
                security: str | None, preset: str | None, username: str, auth_kind: str,
                password_stdin: bool, oauth_provider: str | None, refresh_token_stdin: bool,
                folders: str | None, name: str | None, first_sync_days: int | None) -> None:
    """Register a mailbox; prints {"id": ...}. Its first sync happens at the next schedule tick.

    \b
    With a password:  --host H --port P --security S --username U --password-stdin
    With OAuth2:      --auth oauth2 --oauth-provider NAME --preset gmail --username EMAIL
                      --refresh-token-stdin   (or `mailferry oauth authorize`, no raw token)
    App-only OAuth2:  --auth oauth2-app --oauth-provider NAME --preset outlook --username EMAIL
    """
    if bool(owner) == system:
        raise click.UsageError("give exactly one of --owner EMAIL or --system")
    host, port, security = app_oauth.server_settings(preset, host, port, security)
    validation.host(host, "--host")
    validation.username(username, "--username")
    selection = folders.split(",") if folders else None
    if auth_kind == "password":
        if not password_stdin or oauth_provider or refresh_token_stdin:
            raise click.UsageError("a password mailbox needs --password-stdin (and no OAuth2 "
                                   "option)")
        password = _read_password()
        settings = _settings()
        mailbox_id = app.add_mailbox(
            _conn(settings), PasswordBox(settings.secret_key), owner_email=owner or None,
            host=host, port=port, security=security, username=username, password=password,
            folders=selection, name=name, first_sync_days=first_sync_days)
    else:
        if password_stdin or not oauth_provider:
            raise click.UsageError(f"--auth {auth_kind} needs --oauth-provider NAME (and no "
                                   "--password-stdin)")
        app_only = auth_kind == "oauth2-app"
        if app_only == refresh_token_stdin:
            raise click.UsageError("--auth oauth2 needs --refresh-token-stdin; --auth oauth2-app "
                                   "takes no token")
        token = _read_secret("refresh token") if refresh_token_stdin else None
        settings = _settings()
        mailbox_id = app_oauth.add_oauth_mailbox(
            _conn(settings), PasswordBox(settings.secret_key), owner_email=owner or None,
            provider=oauth_provider, username=username, refresh_token=token, app_only=app_only,
            host=host, port=port, security=security, folders=selection, name=name,
            first_sync_days=first_sync_days)
    _json({"id": mailbox_id})


@mailbox_group.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
def mailbox_import(file: Any) -> None:
    """Register many mailboxes from a JSON Lines FILE (- for standard input); prints
    {"ids": [...]}, in the lines' order.

    One object per line with the options of `mailbox add` as fields, the password included:
    {"owner": "ann@example.com", "host": "imap.example.com", "port": 993, "security": "ssl",
    "username": "ann", "password": "...", "folders": ["INBOX", "Sent"]} ("system": true instead
    of "owner"; optional "folders", "name", "first_sync_days"; "preset": "gmail" or "outlook"
    instead of host, port and security).

    \b
    OAuth2 (as --auth):  "auth": "oauth2", "oauth_provider": "NAME", "refresh_token": "..."
                         "auth": "oauth2-app", "oauth_provider": "NAME"   (no token)
    An OAuth2 line has no "password"; only "oauth2" has a "refresh_token".

    Every line is checked first, owners and providers included: one wrong line imports nothing,
    and the error names each wrong line and field (never a value).
    """
    settings = _settings()
    ids = app.import_mailboxes(_conn(settings), PasswordBox(settings.secret_key), file)
    _json({"ids": ids})


def _read_secret(what: str) -> str:
    value = sys.stdin.readline().strip()
    if not value:
        raise click.UsageError(f"no {what} on standard input")
    return value


@mailbox_group.command("update")
@click.argument("mailbox_id", type=int)
@click.option("--host", help="a new IMAP host name or IP address")
@click.option("--port", type=click.IntRange(1, 65535), help="a new port")
@click.option("--security", type=click.Choice(["ssl", "starttls", "none"]),
              help="a new security mode")
@click.option("--username", help="a new IMAP login")
@click.option("--password-stdin", is_flag=True, help="read the new password from standard input")
@click.option("--refresh-token-stdin", is_flag=True,
              help="read a new OAuth2 refresh token from standard input (re-authorized)")
@click.option("--name", help="a new display name")
@click.option("--sync/--no-sync", "sync_enabled", default=None, help="enable or disable its sync")
@click.option("--push/--no-push", "push", default=None,
              help="watch it for changes (IDLE/NOTIFY) or leave it to the schedule")
@click.option("--first-sync-days", type=click.IntRange(1, validation.MAX_FIRST_SYNC_DAYS),
              help="days of mail a folder's first sync loads")
def mailbox_update(mailbox_id: int, host: str | None, port: int | None, security: str | None,
                   username: str | None, password_stdin: bool, refresh_token_stdin: bool,
                   name: str | None, sync_enabled: bool | None,
                   first_sync_days: int | None, push: bool | None) -> None:
    """Change a mailbox's settings; prints {"id": ..., "run_id": ...}.

    New connection settings, or a new refresh token, clear the "credentials invalid" state and
    trigger a sync at once.
    """
    if refresh_token_stdin:
        if any(v is not None for v in (host, port, security, username, name, sync_enabled,
                                       first_sync_days, push)) or password_stdin:
            raise click.UsageError("--refresh-token-stdin goes alone")
        token = _read_secret("refresh token")
        settings = _settings()
        with app.publisher(settings) as publisher:
            updated = app_oauth.set_refresh_token(_conn(settings), PasswordBox(settings.secret_key),
                                                  publisher.publish, mailbox_id, token)
        _json({"id": updated.id, "run_id": updated.run_id})
        return
    changes = app.MailboxChanges(host=host, port=port, security=security, username=username,
                                 name=name, sync_enabled=sync_enabled,
                                 first_sync_days=first_sync_days, push=push)
    changes.validate()
    settings = _settings()
    conn = _conn(settings)
    app.get_mailbox(conn, mailbox_id)
    box = None
    if password_stdin:
        changes = dataclasses.replace(changes, password=_read_password())
        box = PasswordBox(settings.secret_key)
    if changes == app.MailboxChanges():
        raise click.UsageError("nothing to change")
    with app.publisher(settings) as publisher:
        updated = app.update_mailbox(conn, box, publisher.publish, mailbox_id, changes)
    _json({"id": updated.id, "run_id": updated.run_id})


@mailbox_group.command("remove")
@click.argument("mailbox_id", type=int)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--batch", default=removal.DEFAULT_BATCH, show_default=True,
              type=click.IntRange(1, 100000), help="rows deleted per transaction")
def mailbox_remove(mailbox_id: int, yes: bool, batch: int) -> None:
    """Stop syncing a mailbox and delete everything stored for it (folders, messages, raw mail
    no other mailbox holds, notifications, its password); prints what was removed as JSON.

    A sync in flight is fenced off at once. Safe to run again after an interruption."""
    conn = _conn(_settings())
    summary = removal.mailbox_summary(conn, mailbox_id)
    _confirm(f"Remove mailbox {mailbox_id} ({summary['name']}) and its {summary['messages']} "
             "stored message(s)?", yes)
    _json(app.remove_mailbox(conn, mailbox_id, batch=batch))


@mailbox_group.command("list")
@_JSON
def mailbox_list(as_json: bool) -> None:
    """List mailboxes with their sync state (never their passwords)."""
    rows = app.list_mailboxes(_conn(_settings()))
    if as_json:
        _json(rows)
    else:
        _table(rows, ["id", "name", "owner", "host", "security", "auth_kind", "last_sync_status",
                      "last_sync_at", "messages", "watch", "watch_holder", "throttled_until",
                      "waiting", "token_expires_at", "token_refreshed_at", "last_error", "folder_notes"])


@mailbox_group.command("check")
@click.argument("mailbox_id", type=int)
@_JSON
def mailbox_check(mailbox_id: int, as_json: bool) -> None:
    """Log in now and show the folder tree: the "check connection" button.

    ``--json`` keeps the flat ``folders`` list and adds ``tree``: the same folders nested
    (``name`` the last part, ``path`` the full name, ``children``)."""
    settings = _settings()
    conn = _conn(settings)
    app.get_mailbox(conn, mailbox_id)
    try:
        result = app.check_mailbox(conn, PasswordBox(settings.secret_key), settings, mailbox_id)
    except (ImapError, NoConnectionSlot) as exc:
        if as_json:
            _json({"ok": False, "error_kind": exc.kind, "error": str(exc)})
            sys.exit(EXIT_FAILED)
        _die(str(exc), EXIT_FAILED)
    if as_json:
        _json(result.as_dict())
        return
    click.echo(f"ok: logged in to {result.server} ({result.security}) as "
               f"{_visible(result.username)} in {result.seconds}s")
    for root in result.tree:
        _echo_folder(root, depth=0)


def _echo_folder(folder: Folder, depth: int) -> None:
    """One line per folder, indented by depth: name (type[, not selectable])  flags."""
    notes = [folder.type] + ([] if folder.selectable else ["not selectable"])
    flags = " ".join(folder.flags)
    click.echo(f"  {'  ' * depth}{_visible(folder.name)}  ({', '.join(notes)})"
               + (f"  {_visible(flags)}" if flags else ""))
    for child in folder.children:
        _echo_folder(child, depth + 1)


@mailbox_group.command("folders")
@click.argument("mailbox_id", type=int)
@click.option("--enable", "enable", multiple=True, help="folder to sync (repeatable)")
@click.option("--disable", "disable", multiple=True, help="folder to stop syncing (repeatable)")
@_JSON
def mailbox_folders(mailbox_id: int, enable: tuple[str, ...], disable: tuple[str, ...],
                    as_json: bool) -> None:
    """Show the mailbox's folders, and enable or disable their sync.

    A change queues a folder sync at once (SyncFolders: the folder list, not the mail)."""
    settings = _settings()
    conn = _conn(settings)
    with app.publisher(settings) as publisher:
        app.set_folders(conn, publisher.publish, mailbox_id, enable=enable, disable=disable)
    rows = app.list_folders(conn, mailbox_id)
    if as_json:
        _json(rows)
    else:
        _table(rows, ["name", "type", "selectable", "sync_enabled", "messages", "last_synced_at",
                      "gone_at", "last_error"])
        for note in app.selection_notes(folder_report(conn, mailbox_id)):
            click.echo(f"selection: {_visible(note)}")


# --- sync -------------------------------------------------------------------------------------


@cli.command("sync")
@click.option("--all", "all_", is_flag=True, help="every enabled mailbox")
@click.option("--mailbox", "mailbox_ids", multiple=True, type=int, help="mailbox id (repeatable)")
@click.option("--force", is_flag=True,
              help="also disabled mailboxes or ones with invalid credentials; re-scan the whole "
                   "first-sync window instead of only new UIDs")
@click.option("--wait", is_flag=True, help="return when the syncs are stored")
@click.option("--timeout", type=click.FloatRange(0, 7 * 86400), default=3600.0, show_default=True,
              help="seconds to wait with --wait")
@_JSON
def sync(all_: bool, mailbox_ids: tuple[int, ...], force: bool, wait: bool, timeout: float,
         as_json: bool) -> None:
    """Publish SyncMailbox commands now: the manual counterpart of the schedule."""
    if all_ == bool(mailbox_ids):
        raise click.UsageError("give --all or at least one --mailbox ID")
    if not math.isfinite(timeout):
        raise click.BadParameter("must be a number of seconds", param_hint="--timeout")
    settings = _settings()
    conn = _conn(settings)
    with publishing.publisher_pool(settings) as pool:  # `--all`: many commands at once
        requested = app.request_sync(conn, pool.publish, None if all_ else mailbox_ids,
                                     force=force, parallel=pool.size,
                                     publish_many=pool.publish_many)
    runs = {r.run_id: r for r in requested}
    if not wait:
        out = [{"mailbox_id": r.mailbox_id, "run_id": r.run_id,
                "status": "queued" if r.queued else "already-active"} for r in requested]
        if as_json:
            _json(out)
        for o in out if not as_json else []:
            click.echo(f"mailbox {o['mailbox_id']}: run {o['run_id']} {o['status']}")
        return
    final = _wait_for_runs(conn, list(runs), timeout, progress=not as_json)
    reports = folder_reports(conn, [r["mailbox_id"] for r in final])
    for r in final:
        r["folder_notes"] = app.selection_notes(reports.get(r["mailbox_id"]))
    if as_json:
        _json(final)
    else:
        for r in final:
            line = f"mailbox {r['mailbox_id']}: {r['status']}, {r['messages_stored']} messages stored"
            click.echo(line + (f" ({_visible(r['error'])})" if r["error"] else ""))
            for note in r["folder_notes"]:
                click.echo(f"  selection: {_visible(note)}")
    if any(r["status"] in ("queued", "running") for r in final):
        sys.exit(EXIT_TIMEOUT)
    if any(r["status"] != "done" for r in final):
        sys.exit(EXIT_FAILED)


def _wait_for_runs(conn: db.Connection, run_ids: list[uuid.UUID], timeout: float,
                   progress: bool) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    bar = progress and sys.stderr.isatty()
    shown = ""
    while True:
        rows = app.run_states(conn, run_ids)
        active = [r for r in rows if r["status"] in ("queued", "running")]
        if bar:
            line = "\r" + _progress_line(rows)
            if line != shown:
                click.echo(line.ljust(len(shown)), nl=False, err=True)
                shown = line
        if not active or time.monotonic() > deadline:
            if shown:
                click.echo("", err=True)
            progress_keys = ("folders_total", "messages_found", "folders_done", "messages_done")
            return [{k: v for k, v in r.items() if k not in progress_keys} for r in rows]
        time.sleep(0.25)


def _progress_line(rows: Sequence[dict[str, Any]], width: int = 30) -> str:
    """``[#########---------] 1200/3000 messages  2/5 folders  0/1 mailboxes``: the messages
    found so far are the total (it grows while folders are searched); a finished run counts
    whole."""
    finished = [r for r in rows if r["status"] not in ("queued", "running")]
    found = done = folders = folders_done = 0
    for r in rows:
        if r in finished:
            n = max(r["messages_found"], r["messages_done"])
            found, done = found + n, done + n
            folders_done += r["folders_total"] or 0
        else:
            found += max(r["messages_found"], r["messages_done"])
            done += r["messages_done"]
            folders_done += min(r["folders_done"], r["folders_total"] or 0)
        folders += r["folders_total"] or 0
    if not folders and len(finished) < len(rows):
        return f"waiting for a fetcher ({len(finished)}/{len(rows)} mailboxes done)"
    filled = width * done // found if found else (width if len(finished) == len(rows) else 0)
    return (f"[{'#' * filled}{'-' * (width - filled)}] {done}/{found} messages  "
            f"{folders_done}/{folders} folders  {len(finished)}/{len(rows)} mailboxes")




# --- messages ---------------------------------------------------------------------------------


@cli.group("messages")
def messages_group() -> None:
    """Stored messages."""


@messages_group.command("list")
@click.option("--mailbox", "mailbox_id", required=True, type=int, help="the mailbox id (mailbox list)")
@click.option("--folder", help="only this folder (name as shown, or raw name)")
@_JSON
def messages_list(mailbox_id: int, folder: str | None, as_json: bool) -> None:
    """One entry per message and folder it is in (expunged ones left out).

    Mail of a first sync is listed as soon as it is stored, and its parsed fields (date, from,
    subject, ...) once the persisters have parsed it, seconds later: until then `parsed` is
    false (--json) and the subject reads "(not parsed yet)"."""
    rows = app.list_messages(_conn(_settings()), mailbox_id, folder)
    if as_json:
        _json(rows)
    else:
        _table([r if r["parsed"] else {**r, "subject": "(not parsed yet)"} for r in rows],
               ["id", "folder", "uid", "date", "from", "subject", "seen", "size"])


@messages_group.command("search")
@click.option("--mailbox", "mailbox_id", required=True, type=int, help="the mailbox id (mailbox list)")
@click.argument("query")
@click.option("--folder", help="only messages in this folder (name as shown, or raw name)")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="at most this many results")
@_JSON
def messages_search(mailbox_id: int, query: str, folder: str | None, limit: int,
                    as_json: bool) -> None:
    """Find the mailbox's messages by words of their subject, addresses and body; best first.

    QUERY: words (all must match), "a phrase", OR between alternatives, -word to exclude, and
    subject:, from:, to: (to, cc or bcc) or body: before a word or phrase to look only there.
    Case and accents do not matter. Expunged messages are left out, as in `messages list`.
    """
    from mailferry.search import search_messages, unindexed

    conn = _conn(_settings())
    app.get_mailbox(conn, mailbox_id)
    hits = search_messages(conn, mailbox_id, query, limit=limit, folder=folder)
    if waiting := unindexed(conn, mailbox_id):  # more than a search indexes on its own
        click.echo(f"mailferry: note: {waiting} messages of mailbox {mailbox_id} are not "
                   "indexed yet (the persisters are catching up); they are not searched",
                   err=True)
    rows = [{"id": h.id, "mailbox_id": h.mailbox_id, "sent_at": h.sent_at, "from": h.from_,
             "to": h.to, "subject": h.subject, "folders": h.folders, "snippet": h.snippet,
             "rank": round(h.rank, 6)} for h in hits]
    if as_json:
        _json(rows)
    else:
        _table([{**r, "date": r["sent_at"]} for r in rows],
               ["id", "date", "from", "subject", "folders"])



@messages_group.command("raw")
@click.argument("message_id", type=int)
def messages_raw(message_id: int) -> None:
    """Write the message's raw RFC 822 bytes, exactly as the server sent them, to stdout."""
    data = app.raw_message(_conn(_settings()), message_id)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# --- notifications ----------------------------------------------------------------------------

@cli.group("notifications")
def notifications_group() -> None:
    """Notifications waiting for a person's next login."""

def _print_notifications(items: list[Any], as_json: bool) -> None:
    if as_json:
        _json([n.model_dump() for n in items])
        return
    if not items:
        click.echo("(none)")
    for n in items:
        body = "\n  ".join(_visible(line) for line in n.body.splitlines())
        click.echo(f"[{n.created_at:%Y-%m-%d %H:%M}] {_visible(n.title)}\n  {body}")

@notifications_group.command("list")
@click.option("--user", "email", required=True, help="the person's email")
@click.option("--all", "all_", is_flag=True, help="read ones too")
@_JSON
def notifications_list(email: str, all_: bool, as_json: bool) -> None:
    """Show the person's unread notifications (without marking them read)."""
    _print_notifications(app.list_notifications(_conn(_settings()), email, unread_only=not all_),
                         as_json)


@notifications_group.command("pop")
@click.option("--user", "email", required=True, help="the person's email")
@_JSON
def notifications_pop(email: str, as_json: bool) -> None:
    """Return the unread notifications and mark them read: what a host application calls when
    the person logs in."""
    _print_notifications(app.pop_notifications(_conn(_settings()), email), as_json)


# --- dead letters -----------------------------------------------------------------------------


@cli.group("dead-letters")
def dead_letters_group() -> None:
    """Messages that could not be processed, kept with their reason."""


def _queue_option(name: str | None) -> str | None:
    try:
        dead_letters.queues(name)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--queue") from exc
    return name


@dead_letters_group.command("list")
@click.option("--queue", "queue_name", help="a work queue (default: all)")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000),
              help="at most this many messages")
@_JSON
def dead_letters_list(queue_name: str | None, limit: int, as_json: bool) -> None:
    """Show dead-lettered messages and why; they stay where they are."""
    out = app.list_dead_letters(_settings().broker_url, _queue_option(queue_name), limit)
    if as_json:
        _json(out)
    else:
        _table(out, ["queue", "type", "mailbox_id", "failed_at", "attempts", "error", "note"])


@dead_letters_group.command("replay")
@click.option("--queue", "queue_name", help="a work queue (default: all)")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000),
              help="at most this many messages")
def dead_letters_replay(queue_name: str | None, limit: int) -> None:
    """Send dead-lettered messages back to their work queue, with a fresh retry budget."""
    settings = _settings()
    queue = _queue_option(queue_name)
    with app.publisher(settings) as publisher:
        replayed = app.replay_dead_letters(settings.broker_url, publisher, queue, limit)
    _json({"replayed": replayed})


# --- status -----------------------------------------------------------------------------------


@cli.command("status")
@_JSON
def status(as_json: bool) -> None:
    """Counts and recent runs from PostgreSQL, queue depths from RabbitMQ."""
    settings = _settings()
    result = app.status(_conn(settings), settings)
    if as_json:
        _json(result)
        return
    for key, value in result.items():
        if key not in ("runs", "recent_runs", "queues", "watches", "watch_holders",
                       "oauth_mailboxes", "sync_lag"):
            click.echo(f"{key}: {value}")
    click.echo("runs: " + (", ".join(f"{k} {v}" for k, v in result["runs"].items()) or "none"))
    click.echo("watches: " + (", ".join(f"{k} {v}" for k, v in result["watches"].items())
                              or "none"))
    for holder, count in result["watch_holders"].items():
        click.echo(f"  {holder}: {count}")
    lag = result["sync_lag"]
    quantiles = ", ".join(f"{'max' if float(q) == 1 else f'p{float(q) * 100:g}'} {_seconds(v)}"
                          for q, v in lag["quantiles"].items() if v is not None)
    click.echo(f"sync lag (since the last completed sync, {lag['mailboxes']} enabled mailboxes): "
               f"{quantiles or 'none synced yet'}; never synced {lag['never_synced']}, "
               f"throttled {lag['throttled']}")
    click.echo("queues:")
    for name, depth in result["queues"].items():
        click.echo(f"  {name}: {depth}")
    if result["oauth_mailboxes"]:
        click.echo("OAuth2 mailboxes:")
        _table(result["oauth_mailboxes"], ["mailbox_id", "auth_kind", "provider",
                                           "token_expires_at", "token_refreshed_at",
                                           "last_refresh_error"])
    click.echo("recent runs:")
    _table(result["recent_runs"], ["run_id", "mailbox_id", "status", "requested_by",
                                   "requested_at", "messages_stored", "error"])


cli.add_command(changes)  # mailferry changes tail|list (services/cli/changes.py)


def _seconds(value: float) -> str:
    """A lag for people: 42s, 12m, 3.5h, 2.0d."""
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    if value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"


# --- services ---------------------------------------------------------------------------------


def _service(name: str) -> Callable[[], None]:
    def run() -> None:
        settings = _settings()
        module = __import__(f"services.{name}.main", fromlist=["main"])
        module.main(settings)

    run.__doc__ = f"Run the {name} service in the foreground."
    return run


cli.add_command(oauth_cli.oauth_group)

for _name in ("scheduler", "fetcher", "persister", "notifier"):
    cli.command(_name)(_service(_name))


@cli.command("up")
@click.option("--fetchers", default=1, type=click.IntRange(1, 64), show_default=True,
              help="fetcher workers (IMAP -> events)")
@click.option("--persisters", default=1, type=click.IntRange(1, 64), show_default=True,
              help="persister workers (events -> PostgreSQL)")
def up(fetchers: int, persisters: int) -> None:
    """All four services under one supervisor, for a single machine; Ctrl-C stops them."""
    from mailferry.services.cli.supervisor import supervise

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format, service="supervisor")
    db.migrate(settings.database_url)  # once here, rather than raced by every child
    supervise({"scheduler": 1, "fetcher": fetchers, "persister": persisters, "notifier": 1},
              metrics_port=settings.metrics_port)


def main() -> None:
    """Every error, usage errors included, is one line on stderr with a stable exit code.
    Log lines go to stderr too (the services configure their own logging): stdout is the
    command's output, JSON with ``--json``."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=current_stderr()))
    try:
        code = cli.main(prog_name="mailferry", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "mailferry"
        command = where.removeprefix("mailferry").strip()
        _die(f"{command + ': ' if command else ''}{exc.format_message()} (see '{where} --help')",
             EXIT_USAGE)
    except click.Abort:
        _die("interrupted", EXIT_FAILED)
    except click.ClickException as exc:
        _die(exc.format_message(), exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
