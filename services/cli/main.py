"""The ``mailferry`` command: operator CLI and service entry points.

A stable interface other tools script: names, JSON shapes and exit codes are kept.

Exit codes: 0 success; 1 what was asked failed (a refused login, a failed sync); 2 bad usage or
configuration; 3 timed out (``sync --wait``); 4 a dependency is unavailable (PostgreSQL, RabbitMQ).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, NoReturn, TypeVar

import click

from shared import db, repository
from shared.config import Settings, load_settings
from shared.crypto import PasswordBox, generate_key
from shared.errors import (
    BrokerUnavailable,
    ConfigError,
    DatabaseUnavailable,
    ImapError,
    MailferryError,
    NotFound,
    TransientError,
)
from shared.imap import Folder, ImapEmailFolderManager, connector_factory
from shared.logging import configure_logging

EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNAVAILABLE = 1, 2, 3, 4
F = TypeVar("F", bound=Callable[..., Any])
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
    conn = _conn(settings)
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, password_encrypted FROM mailboxes ORDER BY id FOR UPDATE").fetchall()
        for row in rows:
            conn.execute("UPDATE mailboxes SET password_encrypted = %s WHERE id = %s",
                         (box.rotate(row["password_encrypted"]), row["id"]))
    _json({"rotated": len(rows)})


# --- users ------------------------------------------------------------------------------------


@cli.group("user")
def user_group() -> None:
    """People who own mailboxes and receive notifications."""


@user_group.command("add")
@click.option("--email", required=True, help="their address: notification emails go there")
@click.option("--name", help="a display name")
@click.option("--capability", "capabilities", multiple=True,
              help="e.g. imap_sync_origin_credential_notifications (repeatable)")
def user_add(email: str, name: str | None, capabilities: tuple[str, ...]) -> None:
    """Create a user; prints {"id": ...}."""
    if "@" not in email:
        raise click.BadParameter("must be an email address", param_hint="--email")
    _printable(email, "--email")  # it becomes the To: header of notification emails
    conn = _conn(_settings())
    row = conn.execute(
        """INSERT INTO users (email, name, capabilities) VALUES (%s, %s, %s)
           ON CONFLICT DO NOTHING RETURNING id""",
        (email, name, sorted(set(capabilities))),
    ).fetchone()
    if row is None:
        _die(f"a user with email {email} already exists", EXIT_FAILED)
    _json({"id": row["id"]})


@user_group.command("list")
@_JSON
def user_list(as_json: bool) -> None:
    """List users."""
    rows = _conn(_settings()).execute(
        "SELECT id, email, name, enabled, capabilities FROM users ORDER BY id").fetchall()
    if as_json:
        _json(rows)
    else:
        _table(rows, ["id", "email", "name", "enabled", "capabilities"])


# --- mailboxes --------------------------------------------------------------------------------


@cli.group("mailbox")
def mailbox_group() -> None:
    """IMAP mailboxes to synchronize."""


@mailbox_group.command("add")
@click.option("--owner", help="email of the owning user")
@click.option("--system", is_flag=True, help="a system mailbox, owned by no one")
@click.option("--host", required=True, help="the IMAP server's host name")
@click.option("--port", required=True, type=click.IntRange(1, 65535),
              help="993 for ssl, 143 for starttls or none")
@click.option("--security", required=True, type=click.Choice(["ssl", "starttls", "none"]),
              help="ssl: TLS from the start; starttls: upgraded, never downgraded; none: clear text")
@click.option("--username", required=True, help="the IMAP login")
@click.option("--password-stdin", is_flag=True, required=True,
              help="read the password from standard input (never from the command line)")
@click.option("--folders", help="comma-separated folders to sync (default: inbox and sent)")
@click.option("--name", help="a display name (default: username@host)")
@click.option("--first-sync-days", type=click.IntRange(min=1),
              help="the first sync loads this many days (default MAILFERRY_FIRST_SYNC_DAYS)")
def mailbox_add(owner: str | None, system: bool, host: str, port: int, security: str,
                username: str, password_stdin: bool, folders: str | None, name: str | None,
                first_sync_days: int | None) -> None:
    """Register a mailbox; prints {"id": ...}. Its first sync happens at the next schedule tick."""
    if bool(owner) == system:
        raise click.UsageError("give exactly one of --owner EMAIL or --system")
    _printable(host, "--host")
    _printable(username, "--username")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.UsageError("no password on standard input")
    settings = _settings()
    box = PasswordBox(settings.secret_key)
    conn = _conn(settings)
    owner_id = None
    if owner:
        user = conn.execute("SELECT id FROM users WHERE lower(email) = lower(%s)",
                            (owner,)).fetchone()
        if user is None:
            raise NotFound(f"no user with email {owner}; create it with `mailferry user add`")
        owner_id = user["id"]
    selection = [f.strip() for f in folders.split(",") if f.strip()] if folders else None
    row = conn.execute(
        """INSERT INTO mailboxes (owner_id, name, host, port, security, username,
                                  password_encrypted, initial_folders, first_sync_days)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (owner_id, name or f"{username}@{host}", host, port, security, username,
         box.encrypt(password), selection, first_sync_days),
    ).fetchone()
    assert row is not None
    _json({"id": row["id"]})


@mailbox_group.command("update")
@click.argument("mailbox_id", type=int)
@click.option("--host", help="a new IMAP host name")
@click.option("--port", type=click.IntRange(1, 65535), help="a new port")
@click.option("--security", type=click.Choice(["ssl", "starttls", "none"]),
              help="a new security mode")
@click.option("--username", help="a new IMAP login")
@click.option("--password-stdin", is_flag=True, help="read the new password from standard input")
@click.option("--name", help="a new display name")
@click.option("--sync/--no-sync", "sync_enabled", default=None, help="enable or disable its sync")
@click.option("--first-sync-days", type=click.IntRange(min=1),
              help="days of mail a folder's first sync loads")
def mailbox_update(mailbox_id: int, host: str | None, port: int | None, security: str | None,
                   username: str | None, password_stdin: bool, name: str | None,
                   sync_enabled: bool | None, first_sync_days: int | None) -> None:
    """Change a mailbox's settings; prints {"id": ..., "run_id": ...}.

    New connection settings clear the "credentials invalid" state and trigger a sync at once.
    """
    from shared.broker import Publisher
    from shared.sync_requests import request_syncs

    _printable(host, "--host")
    _printable(username, "--username")
    settings = _settings()
    conn = _conn(settings)
    _mailbox(conn, mailbox_id)
    changes: dict[str, Any] = {"host": host, "port": port, "security": security,
                               "username": username, "name": name,
                               "sync_enabled": sync_enabled, "first_sync_days": first_sync_days}
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.UsageError("no password on standard input")
        changes["password_encrypted"] = PasswordBox(settings.secret_key).encrypt(password)
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise click.UsageError("nothing to change")
    reconnect = bool({"host", "port", "security", "username", "password_encrypted"} & set(changes))
    assignments = ", ".join(f"{column} = %({column})s" for column in changes)
    row = conn.execute(
        f"""UPDATE mailboxes SET {assignments}, updated_at = now(),
                   credentials_invalid_at = CASE WHEN %(reconnect)s THEN NULL
                                                 ELSE credentials_invalid_at END
             WHERE id = %(id)s RETURNING sync_enabled""",
        {**changes, "reconnect": reconnect, "id": mailbox_id},
    ).fetchone()
    assert row is not None
    run_id = None
    if reconnect and row["sync_enabled"]:
        publisher = Publisher(settings.broker_url, settings.retry_delays)
        try:
            run_id = request_syncs(conn, publisher.publish, [mailbox_id], requested_by="cli")[0].run_id
        finally:
            publisher.close()
    _json({"id": mailbox_id, "run_id": run_id})


def _printable(value: str | None, hint: str) -> None:
    """Host, user name and email reach protocol lines (DNS, TLS, IMAP LOGIN, an email's To:): a
    control character there (CR/LF most of all) could end a line and start another command."""
    if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise click.BadParameter("must not contain control characters (CR, LF, NUL...)",
                                 param_hint=hint)


_MAILBOX_LIST = """
SELECT m.id, m.name, u.email AS owner, m.host, m.port, m.security, m.username, m.sync_enabled,
       m.last_sync_at, m.last_sync_status, m.last_error,
       m.credentials_invalid_at IS NOT NULL AS credentials_invalid,
       (SELECT count(*) FROM folders f WHERE f.mailbox_id = m.id AND f.sync_enabled)
           AS folders_enabled,
       (SELECT count(*) FROM messages g WHERE g.mailbox_id = m.id) AS messages,
       m.folder_report
  FROM mailboxes m LEFT JOIN users u ON u.id = m.owner_id
 ORDER BY m.id"""


def _selection_notes(report: dict[str, Any] | None) -> list[str]:
    """What became of the --folders selection: "Sent -> INBOX.Sent" where the server's name
    differs, and the names that select nothing (unmatched, or an enabled folder vanished)."""
    report = report or {}
    notes = [f"{s['name']} -> {s['resolved_as']}" for s in report.get("selection") or ()
             if s.get("resolved_as") and s["resolved_as"] != s["name"]]
    notes += [f"no folder {name!r} on the server" for name in report.get("unmatched") or ()]
    notes += [f"enabled folder {name!r} vanished from the server"
              for name in report.get("vanished") or ()]
    return notes


@mailbox_group.command("list")
@_JSON
def mailbox_list(as_json: bool) -> None:
    """List mailboxes with their sync state (never their passwords)."""
    rows = _conn(_settings()).execute(_MAILBOX_LIST).fetchall()
    for row in rows:
        row["folder_notes"] = "; ".join(_selection_notes(row["folder_report"])) or None
    if as_json:
        _json(rows)
    else:
        _table(rows, ["id", "name", "owner", "host", "security", "last_sync_status",
                      "last_sync_at", "messages", "last_error", "folder_notes"])


def _mailbox(conn: db.Connection, mailbox_id: int) -> repository.Mailbox:
    mailbox = repository.get_mailbox(conn, mailbox_id)
    if mailbox is None:
        raise NotFound(f"no mailbox with id {mailbox_id}")
    return mailbox


@mailbox_group.command("check")
@click.argument("mailbox_id", type=int)
@_JSON
def mailbox_check(mailbox_id: int, as_json: bool) -> None:
    """Log in now and show the folder tree: the "check connection" button.

    ``--json`` keeps the flat ``folders`` list and adds ``tree``: the same folders nested
    (``name`` the last part, ``path`` the full name, ``children``)."""
    settings = _settings()
    mailbox = _mailbox(_conn(settings), mailbox_id)
    config = mailbox.imap_config(PasswordBox(settings.secret_key), timeout=settings.imap_timeout,
                                 ca_file=settings.imap_ca_file,
                                 allow_private_networks=settings.allow_private_networks,
                                 limits=settings.imap_limits())
    started = time.monotonic()
    try:
        with connector_factory.create_imap_connector(config) as connector:
            tree = ImapEmailFolderManager(connector).get_folders(None, recursive=True)
            capabilities = sorted(connector.capabilities())
    except ImapError as exc:
        if as_json:
            _json({"ok": False, "error_kind": exc.kind, "error": str(exc)})
            sys.exit(EXIT_FAILED)
        _die(str(exc), EXIT_FAILED)
    folders = [f for root in tree for f in root.walk()]
    result = {
        "ok": True,
        "server": config.address,
        "security": config.security,
        "seconds": round(time.monotonic() - started, 3),
        "capabilities": capabilities,
        "folders": [{"name": f.path, "raw_name": f.raw_name, "delimiter": f.delimiter,
                     "flags": list(f.flags), "type": f.type, "selectable": f.selectable,
                     "uidvalidity": None} for f in folders],
        "tree": [root.to_dict() for root in tree],
    }
    if as_json:
        _json(result)
        return
    click.echo(f"ok: logged in to {config.address} ({config.security}) as {_visible(config.username)} "
               f"in {result['seconds']}s")
    for root in tree:
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
    conn = _conn(_settings())
    _mailbox(conn, mailbox_id)
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
    if enable or disable:
        # The selection changed: refresh the folder list at once (not the mail), as users expect.
        from shared.broker import Publisher
        from shared.sync_requests import request_syncs

        settings = _settings()
        publisher = Publisher(settings.broker_url, settings.retry_delays)
        try:
            request_syncs(conn, publisher.publish, [mailbox_id], requested_by="cli",
                          folders_only=True)
        finally:
            publisher.close()
    rows = conn.execute(
        """SELECT f.name, f.raw_name, f.delimiter, f.type, f.selectable, f.sync_enabled,
                  f.uidvalidity, f.last_uid, f.last_synced_at, f.gone_at, f.last_error,
                  (SELECT count(*) FROM message_folders mf WHERE mf.folder_id = f.id
                      AND mf.expunged_at IS NULL) AS messages
             FROM folders f WHERE f.mailbox_id = %s ORDER BY f.name""",
        (mailbox_id,),
    ).fetchall()
    if as_json:
        _json(rows)
    else:
        _table(rows, ["name", "type", "selectable", "sync_enabled", "messages", "last_synced_at",
                      "gone_at", "last_error"])
        report = conn.execute("SELECT folder_report FROM mailboxes WHERE id = %s",
                              (mailbox_id,)).fetchone()
        for note in _selection_notes(report["folder_report"] if report else None):
            click.echo(f"selection: {_visible(note)}")


# --- sync -------------------------------------------------------------------------------------


@cli.command("sync")
@click.option("--all", "all_", is_flag=True, help="every enabled mailbox")
@click.option("--mailbox", "mailbox_ids", multiple=True, type=int, help="mailbox id (repeatable)")
@click.option("--force", is_flag=True,
              help="also disabled mailboxes or ones with invalid credentials; re-scan the whole "
                   "first-sync window instead of only new UIDs")
@click.option("--wait", is_flag=True, help="return when the syncs are stored")
@click.option("--timeout", type=float, default=3600.0, show_default=True,
              help="seconds to wait with --wait")
@_JSON
def sync(all_: bool, mailbox_ids: tuple[int, ...], force: bool, wait: bool, timeout: float,
         as_json: bool) -> None:
    """Publish SyncMailbox commands now: the manual counterpart of the schedule."""
    from shared.broker import Publisher
    from shared.sync_requests import request_syncs

    if all_ == bool(mailbox_ids):
        raise click.UsageError("give --all or at least one --mailbox ID")
    settings = _settings()
    conn = _conn(settings)
    if all_:
        ids = [r["id"] for r in conn.execute(
            "SELECT id FROM mailboxes WHERE sync_enabled OR %s ORDER BY id", (force,)).fetchall()]
    else:
        ids = list(dict.fromkeys(mailbox_ids))
        for mailbox_id in ids:
            mailbox = _mailbox(conn, mailbox_id)
            if not mailbox.sync_enabled and not force:
                raise ConfigError(f"mailbox {mailbox_id} has sync disabled; use --force")
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    try:
        requested = request_syncs(conn, publisher.publish, ids, requested_by="cli", force=force,
                                  wait_behind_folder_runs=30.0)
    finally:
        publisher.close()
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
    reports = {r["id"]: r["folder_report"] for r in conn.execute(
        "SELECT id, folder_report FROM mailboxes WHERE id = ANY(%s)",
        ([r["mailbox_id"] for r in final],)).fetchall()}
    for r in final:
        r["folder_notes"] = _selection_notes(reports.get(r["mailbox_id"]))
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
        rows = conn.execute(
            """SELECT r.id AS run_id, r.mailbox_id, r.status, r.messages_stored, r.error_kind,
                      r.error, r.started_at, r.finished_at,
                      -- progress of the current attempt (its fencing token)
                      r.folders_total, r.messages_found,
                      (SELECT count(*) FROM sync_folders f WHERE f.run_id = r.id
                          AND f.lease_token = r.progress_token AND f.completed) AS folders_done,
                      (SELECT coalesce(sum(b.messages), 0) FROM sync_batches b
                        WHERE b.run_id = r.id AND b.lease_token = r.progress_token
                      ) AS messages_done
                 FROM sync_runs r WHERE r.id = ANY(%s) ORDER BY r.mailbox_id""",
            (run_ids,),
        ).fetchall()
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
    """One entry per message and folder it is in (expunged ones left out)."""
    conn = _conn(_settings())
    _mailbox(conn, mailbox_id)
    rows = conn.execute(
        """SELECT g.id, f.name AS folder, mf.uid, mf.uidvalidity, g.message_id, g.subject,
                  g.from_addr AS "from", g.to_addrs AS "to", g.sent_at AS date, mf.seen,
                  mf.flags, COALESCE(g.size, mf.size) AS size, encode(g.sha256, 'hex') AS sha256,
                  mf.internal_date, cardinality(g.parse_errors) AS parse_errors,
                  mf.skipped_reason
             FROM message_folders mf
             JOIN folders f ON f.id = mf.folder_id
             LEFT JOIN messages g ON g.id = mf.message_id
            WHERE f.mailbox_id = %s AND mf.expunged_at IS NULL
              AND (%s::text IS NULL OR f.name = %s OR f.raw_name = %s)
            ORDER BY f.name, mf.uid""",
        (mailbox_id, folder, folder, folder),
    ).fetchall()
    if as_json:
        _json(rows)
    else:
        _table(rows, ["id", "folder", "uid", "date", "from", "subject", "seen", "size"])


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
    from shared.search import search_messages, unindexed

    conn = _conn(_settings())
    _mailbox(conn, mailbox_id)
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
    row = _conn(_settings()).execute(
        """SELECT r.data FROM messages g JOIN raw_messages r ON r.sha256 = g.sha256
            WHERE g.id = %s""",
        (message_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no message with id {message_id}")
    sys.stdout.buffer.write(bytes(row["data"]))
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
    from shared.notifications import list_notifications

    _print_notifications(list_notifications(_conn(_settings()), email, unread_only=not all_),
                         as_json)


@notifications_group.command("pop")
@click.option("--user", "email", required=True, help="the person's email")
@_JSON
def notifications_pop(email: str, as_json: bool) -> None:
    """Return the unread notifications and mark them read: what a host application calls when
    the person logs in."""
    from shared.notifications import pop_notifications

    _print_notifications(pop_notifications(_conn(_settings()), email), as_json)


# --- dead letters -----------------------------------------------------------------------------


@cli.group("dead-letters")
def dead_letters_group() -> None:
    """Messages that could not be processed, kept with their reason."""


def _dead_letter_queues(name: str | None) -> list[Any]:
    from shared import topology

    works = [w for w in topology.WORK_QUEUES if name in (None, w.name, w.dead_letter_name)]
    if not works:
        known = ", ".join(w.name for w in topology.WORK_QUEUES)
        raise click.BadParameter(f"unknown queue; one of: {known}", param_hint="--queue")
    return works


@dead_letters_group.command("list")
@click.option("--queue", "queue_name", help="a work queue (default: all)")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000),
              help="at most this many messages")
@_JSON
def dead_letters_list(queue_name: str | None, limit: int, as_json: bool) -> None:
    """Show dead-lettered messages and why; they stay where they are."""
    from shared import broker

    settings = _settings()
    out: list[dict[str, Any]] = []
    with broker.connect(settings.broker_url) as conn:
        for work in _dead_letter_queues(queue_name):
            channel = conn.channel()
            for message in _drain(channel, work.dead_letter_name, limit):
                out.append(_describe_dead_letter(work.name, message))
            channel.close()  # unacknowledged: every message goes back to its queue
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
    from shared import broker

    settings = _settings()
    publisher = broker.Publisher(settings.broker_url, settings.retry_delays)
    replayed = 0
    try:
        with broker.connect(settings.broker_url) as conn:
            for work in _dead_letter_queues(queue_name):
                channel = conn.channel()
                for message in _drain(channel, work.dead_letter_name, limit):
                    headers = {k: v for k, v in (message.headers or {}).items()
                               if not k.startswith("x-")}
                    publisher.publish_raw(message.body, exchange="", routing_key=work.name,
                                          type_=message.properties.get("type"), headers=headers,
                                          content_type=message.properties.get("content_type"))
                    channel.basic_ack(message.delivery_tag)  # only after the broker confirmed
                    replayed += 1
                channel.close()
    finally:
        publisher.close()
    _json({"replayed": replayed})


def _drain(channel: Any, queue: str, limit: int) -> list[Any]:
    out: list[Any] = []
    channel.basic_qos(0, limit, False)
    while len(out) < limit:
        message = channel.basic_get(queue, no_ack=False)
        if message is None:
            break
        out.append(message)
    return out


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _describe_dead_letter(queue: str, message: Any) -> dict[str, Any]:
    from shared.messages import split_body

    headers = message.headers or {}
    json_part, raw_bytes = split_body(message.body)
    try:
        body = json.loads(json_part)
    except (ValueError, TypeError):
        body = {}
    death = (headers.get("x-death") or [{}])[0]
    return {
        "queue": queue,
        "type": message.properties.get("type") or body.get("type"),
        "mailbox_id": body.get("mailbox_id") if isinstance(body, dict) else None,
        "run_id": body.get("run_id") if isinstance(body, dict) else None,
        "error": headers.get("x-mailferry-error") or f"broker: {death.get('reason', '?')}",
        "failed_at": headers.get("x-mailferry-failed-at"),
        "attempts": headers.get("x-mailferry-attempt"),
        "size": len(message.body),
        # a MessagesFetched body: its JSON part (what a person reads), then the mail itself
        "json": _cut(json_part.decode("utf-8", "replace") if isinstance(json_part, bytes)
                     else json_part, 4096),
        "note": f"+ {raw_bytes} bytes of raw messages" if raw_bytes else "",
    }


# --- status -----------------------------------------------------------------------------------


@cli.command("status")
@_JSON
def status(as_json: bool) -> None:
    """Counts and recent runs from PostgreSQL, queue depths from RabbitMQ."""
    settings = _settings()
    conn = _conn(settings)
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
    queues = _queue_depths(settings)
    result = {**(counts or {}), "runs": {r["status"]: r["n"] for r in runs},
              "recent_runs": recent, "queues": queues}
    if as_json:
        _json(result)
        return
    for key, value in (counts or {}).items():
        click.echo(f"{key}: {value}")
    click.echo("runs: " + (", ".join(f"{k} {v}" for k, v in result["runs"].items()) or "none"))
    click.echo("queues:")
    for name, depth in queues.items():
        click.echo(f"  {name}: {depth}")
    click.echo("recent runs:")
    _table(recent, ["run_id", "mailbox_id", "status", "requested_by", "requested_at",
                    "messages_stored", "error"])


def _queue_depths(settings: Settings) -> dict[str, int | str]:
    from shared import broker, topology

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


# --- services ---------------------------------------------------------------------------------


def _service(name: str) -> Callable[[], None]:
    def run() -> None:
        settings = _settings()
        module = __import__(f"services.{name}.main", fromlist=["main"])
        module.main(settings)

    run.__doc__ = f"Run the {name} service in the foreground."
    return run


for _name in ("scheduler", "fetcher", "persister", "notifier"):
    cli.command(_name)(_service(_name))


@cli.command("up")
@click.option("--fetchers", default=1, type=click.IntRange(1, 64), show_default=True,
              help="fetcher workers (IMAP -> events)")
@click.option("--persisters", default=1, type=click.IntRange(1, 64), show_default=True,
              help="persister workers (events -> PostgreSQL)")
def up(fetchers: int, persisters: int) -> None:
    """All four services under one supervisor, for a single machine; Ctrl-C stops them."""
    from services.cli.supervisor import supervise

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format, service="supervisor")
    db.migrate(settings.database_url)  # once here, rather than raced by every child
    supervise({"scheduler": 1, "fetcher": fetchers, "persister": persisters, "notifier": 1})


def main() -> None:
    """Every error, usage errors included, is one line on stderr with a stable exit code."""
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
