"""Hostile names and values never become commands: not IMAP commands (folder names and the
LOGIN user name are quoted strings, control characters are refused) and not SQL (every value is a
query parameter, stored and returned verbatim).

The folder and header cases share one Dovecot mailbox synced once through the fetcher and the
persister (as processes), the way an operator does it: a first sync lists the folders, `mailferry
mailbox folders --enable` selects the hostile ones, `mailferry sync --wait` syncs them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.messages import CredentialsInvalid
from mailferry.services.notifier.channels import SmtpSender
from mailferry.services.notifier.handlers import NotifierDeps
from mailferry.services.notifier.handlers import handle as notify

#: Created over IMAP (imapclient quotes them); each gets one message "in <name>".
FOLDERS = (
    'Quote"d',
    "Back\\slash",
    'Tricky\\" LOGOUT',
    "{5}",
    "Lit {5}",
    "100%",
    "Star*",
    "Données/Été",
    "a (b) [c]",
    'INBOX" LOGOUT',
)
#: Dovecot refuses to CREATE these (a leading "~"; control characters), so they are made as
#: Maildir directories: Dovecot lists them as \Noselect, and they must stay unselected.
UNSELECTABLE = ("~tilde", "Evil\r\nA1 LOGOUT")

SQL_SUBJECT = "'); DROP TABLE messages; --"
SQL_FROM = '"Robert\'); DROP TABLE users;--" <bobby@example.com>'
QUOTED_ID = "'quoted\"id\\@example.com"
LIKE_SUBJECT = "100% _done_ \\ ' \" ;"
HEADERS_MESSAGE = (
    f"Subject: {SQL_SUBJECT}\r\nFrom: {SQL_FROM}\r\nMessage-ID: <{QUOTED_ID}>\r\n\r\nbody\r\n"
).encode()
CRLF_MESSAGE = (b"Subject: =?utf-8?q?first=0D=0ASecond:_injected?=\r\nMessage-ID: <crlf@x>\r\n\r\n"
                b"x\r\n")
LIKE_MESSAGE = f"Subject: {LIKE_SUBJECT}\r\nMessage-ID: <like@x>\r\n\r\ny\r\n".encode()


@dataclass
class Deployment:
    env: dict[str, str]
    conn: db.Connection
    server: Dovecot
    mailbox_id: int
    runs: list[dict[str, Any]]
    processes: services.ServiceProcesses
    messages: list[dict[str, Any]]  # `messages list --json` after the syncs
    folders: dict[str, dict[str, Any]]  # `mailbox folders --json` by name
    legacy_ids: dict[str, int]  # mailboxes whose stored user name the CLI would refuse today
    legacy_run: dict[str, Any]  # the sync of legacy_ids["crlf"]

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return services.run_cli(list(args), self.env, stdin=stdin)

    def json(self, *args: str) -> Any:
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)


def _fill(server: Dovecot) -> None:
    with server.session("mallory") as imap:
        for name in FOLDERS:
            imap.create_folder(name)
            imap.append(name, f"Subject: in {name}\r\n\r\nhello\r\n".encode())
        for raw in (HEADERS_MESSAGE, CRLF_MESSAGE, LIKE_MESSAGE):
            imap.append("INBOX", raw)
    root = server.mail_dir / "mallory" / "Maildir"
    for name in UNSELECTABLE:
        server._make_maildir(root / name)


@pytest.fixture(scope="module")
def deployment(migrated_template: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("injection")
    with services.private_database(template=migrated_template) as database_url, \
            services.private_vhost() as (_, broker_url), \
            Dovecot(tmp / "dovecot") as server, \
            db.connect(database_url, autocommit=True) as conn:
        env = services.deployment_env(database_url, broker_url, MAILFERRY_RETRY_DELAYS="1,2")
        server.add_user("mallory", "pw")
        server.add_user("alice", "secret")  # the target of an injected second LOGIN
        _fill(server)
        assert services.run_cli(["user", "add", "--email", "mallory@example.com"],
                                env).returncode == 0
        added = services.run_cli(
            ["mailbox", "add", "--owner", "mallory@example.com", "--host", server.host, "--port",
             str(server.port), "--security", "none", "--username", "mallory", "--password-stdin"],
            env, stdin=b"pw\n")
        assert added.returncode == 0, added.stderr
        mailbox_id = int(json.loads(added.stdout)["id"])
        processes = services.ServiceProcesses(env, tmp)
        try:
            processes.start("fetcher")
            processes.start("persister")
            d = Deployment(env, conn, server, mailbox_id, [], processes, [], {}, {}, {})
            d.runs += d.json("sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "90",
                             "--json")
            enable = [arg for name in FOLDERS for arg in ("--enable", name)]
            d.json("mailbox", "folders", str(mailbox_id), *enable, "--json")
            d.runs += d.json("sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "90",
                             "--json")
            services.wait_parsed(env["MAILFERRY_DATABASE_URL"], mailbox_id)
            d.messages = _messages(d)
            d.folders = {f["name"]: f for f in d.json("mailbox", "folders", str(mailbox_id),
                                                      "--json")}
            d.legacy_ids = {key: _legacy_mailbox(d, username) for key, username in (
                ("crlf", "nobody\r\nZ1 LOGIN alice secret\r\nZ2 NOOP"),
                ("spaces", 'John "Q" Smith'))}
            synced = d.cli("sync", "--mailbox", str(d.legacy_ids["crlf"]), "--wait", "--timeout",
                           "60", "--json")
            assert synced.returncode == 1, synced.stderr.decode() + processes.logs()
            [d.legacy_run] = json.loads(synced.stdout)
            yield d
        finally:
            processes.stop()


@pytest.fixture
def d(deployment: Deployment) -> Deployment:
    return deployment


def _legacy_mailbox(d: Deployment, username: str) -> int:
    """A mailbox row written before the CLI checked user names (or by another tool)."""
    added = d.cli("mailbox", "add", "--owner", "mallory@example.com", "--host", d.server.host,
                  "--port", str(d.server.port), "--security", "none", "--username", "alice",
                  "--password-stdin", stdin=b"secret\n")
    mailbox_id = int(json.loads(added.stdout)["id"])
    d.conn.execute("UPDATE mailboxes SET username = %s WHERE id = %s", (username, mailbox_id))
    return mailbox_id


def _messages(d: Deployment, *extra: str) -> list[dict[str, Any]]:
    return list(d.json("messages", "list", "--mailbox", str(d.mailbox_id), "--json", *extra))


# --- folder names ---------------------------------------------------------------------------


def test_every_sync_of_a_mailbox_with_hostile_folder_names_finishes_done(d: Deployment) -> None:
    d.processes.assert_running()
    assert [(r["status"], r["error"]) for r in d.runs] == [("done", None)] * 2, d.processes.logs()
    for log in d.processes.log_dir.glob("*.log"):
        assert "message.failed" not in log.read_text(errors="replace"), d.processes.logs()


def test_each_hostile_folder_holds_exactly_its_own_message(d: Deployment) -> None:
    by_folder: dict[str, list[str]] = {}
    for m in d.messages:
        by_folder.setdefault(m["folder"], []).append(m["subject"])
    for name in FOLDERS:
        assert by_folder.pop(name) == [f"in {name}"], name
    # INBOX holds only its own mail: nothing meant for 'INBOX" LOGOUT' leaked into it
    assert sorted(by_folder.pop("INBOX")) == sorted(
        [SQL_SUBJECT, "first\r\nSecond: injected", LIKE_SUBJECT])
    assert by_folder == {}


def test_hostile_folder_names_are_stored_verbatim(d: Deployment) -> None:
    folders = d.folders
    for name in FOLDERS:
        assert folders[name]["sync_enabled"] and folders[name]["selectable"], name
        assert folders[name]["last_error"] is None
    assert folders["Données/Été"]["raw_name"] == "Donn&AOk-es/&AMk-t&AOk-"
    assert folders['INBOX" LOGOUT']["raw_name"] == 'INBOX" LOGOUT'


def test_folders_the_server_cannot_select_are_listed_but_never_synced(d: Deployment) -> None:
    for name in UNSELECTABLE:
        assert (d.folders[name]["selectable"], d.folders[name]["sync_enabled"]) == (False, False)
    refused = d.cli("mailbox", "folders", str(d.mailbox_id), "--enable", UNSELECTABLE[0])
    assert refused.returncode == 2
    assert "has no selectable folder '~tilde'" in refused.stderr.decode()


def test_a_folder_filter_that_looks_like_sql_matches_nothing(d: Deployment) -> None:
    assert _messages(d, "--folder", "' OR '1'='1") == []
    assert [m["subject"] for m in _messages(d, "--folder", "100%")] == ["in 100%"]


def test_enabling_a_folder_named_like_sql_is_a_clean_not_found(d: Deployment) -> None:
    result = d.cli("mailbox", "folders", str(d.mailbox_id), "--enable", "x' OR '1'='1")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("mailferry: error: mailbox")


# --- header values --------------------------------------------------------------------------


def test_a_subject_made_of_sql_round_trips_intact_and_drops_nothing(d: Deployment) -> None:
    row = d.conn.execute("SELECT subject, from_addr, message_id FROM messages WHERE subject = %s",
                         (SQL_SUBJECT,)).fetchone()
    assert row == {"subject": SQL_SUBJECT, "from_addr": SQL_FROM, "message_id": QUOTED_ID}
    tables = d.conn.execute("SELECT count(*) AS n FROM users").fetchone()
    assert tables == {"n": 1}


def test_a_subject_with_an_encoded_crlf_is_stored_with_its_crlf(d: Deployment) -> None:
    subjects = {m["subject"] for m in d.messages if m["folder"] == "INBOX"}
    assert "first\r\nSecond: injected" in subjects


def test_like_wildcards_quotes_and_backslashes_in_a_subject_round_trip(d: Deployment) -> None:
    row = d.conn.execute("SELECT subject FROM messages WHERE message_id = 'like@x'").fetchone()
    assert row == {"subject": LIKE_SUBJECT}


# --- command-line input ---------------------------------------------------------------------


def _add(d: Deployment, *args: str) -> subprocess.CompletedProcess[bytes]:
    base = {"--owner": "mallory@example.com", "--host": d.server.host,
            "--port": str(d.server.port), "--security": "none", "--username": "alice"}
    overrides = dict(zip(args[::2], args[1::2], strict=True))
    argv = [x for k, v in {**base, **overrides}.items() for x in (k, v)]
    return d.cli("mailbox", "add", *argv, "--password-stdin", stdin=b"secret\n")


def _mailbox_count(d: Deployment) -> int:
    row = d.conn.execute("SELECT count(*) AS n FROM mailboxes").fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.parametrize(("option", "value"), [
    ("--host", "evil\r\nhost"),
    ("--username", "nobody\r\nZ1 LOGIN alice secret"),
    ("--username", "alice\x1b[2J"),
])
def test_mailbox_add_refuses_control_characters_in_host_and_user_name(
    d: Deployment, option: str, value: str,
) -> None:
    before = _mailbox_count(d)
    result = _add(d, option, value)
    assert result.returncode == 2
    assert "must not contain control characters" in result.stderr.decode()
    assert _mailbox_count(d) == before


def test_mailbox_update_refuses_a_user_name_with_crlf_and_changes_nothing(d: Deployment) -> None:
    result = d.cli("mailbox", "update", str(d.mailbox_id), "--username", "mallory\r\nZ1 LOGOUT")
    assert result.returncode == 2
    assert "must not contain control characters" in result.stderr.decode()
    assert d.conn.execute("SELECT username FROM mailboxes WHERE id = %s",
                          (d.mailbox_id,)).fetchone() == {"username": "mallory"}


def test_a_display_name_with_control_characters_is_stored_and_printed_as_json_verbatim(
    d: Deployment,
) -> None:
    name = "Evil\x1b[31m 'name'\r\n--"
    added = _add(d, "--name", name)
    assert added.returncode == 0, added.stderr
    mailbox_id = json.loads(added.stdout)["id"]
    [row] = [m for m in d.json("mailbox", "list", "--json") if m["id"] == mailbox_id]
    assert row["name"] == name


def test_a_stored_user_name_with_crlf_is_never_sent_so_no_second_login_is_injected(
    d: Deployment,
) -> None:
    result = d.cli("mailbox", "check", str(d.legacy_ids["crlf"]))
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert "contains a line break or NUL character" in line
    assert "Login: user=<alice>" not in d.server.log_tail(1000)


def test_a_user_name_with_a_space_and_quotes_reaches_the_server_as_one_quoted_string(
    d: Deployment,
) -> None:
    result = d.cli("mailbox", "check", str(d.legacy_ids["spaces"]), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    # a refused login, not a BAD command: the server read one user name and one password
    assert report["error_kind"] == "auth"
    assert "AUTHENTICATIONFAILED" in report["error"]


def test_a_sync_of_a_mailbox_with_a_crlf_user_name_fails_once_as_a_configuration_error(
    d: Deployment,
) -> None:
    run = d.legacy_run
    assert (run["status"], run["error_kind"]) == ("failed", "config"), d.processes.logs()
    assert "line break" in run["error"]
    d.processes.assert_running()
    assert "Login: user=<alice>" not in d.server.log_tail(1000)


# --- values that end up in a notification email ------------------------------------------------


class _SmtpRecorder:
    def __init__(self) -> None:
        self.received: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def test_a_mailbox_named_with_a_line_break_still_gets_its_email_with_a_one_line_subject(
    conn: db.Connection, database_url: str,
) -> None:
    owner = conn.execute("INSERT INTO users (email) VALUES ('alice@example.com') RETURNING id"
                         ).fetchone()
    assert owner is not None
    box = conn.execute(
        """INSERT INTO mailboxes (owner_id, name, host, port, security, username,
                                  password_encrypted)
           VALUES (%s, %s, 'imap.example.com', 993, 'ssl', 'alice', '\\x00') RETURNING id""",
        (owner["id"], "Work\r\nBcc: mallory@evil.example")).fetchone()
    assert box is not None
    recorder, port = _SmtpRecorder(), services.free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        sender = SmtpSender(f"smtp://127.0.0.1:{port}", "mf@example.com", 10, None)
        deps = NotifierDeps(connection=db.Reconnecting(database_url), reminder_seconds=86400,
                            send_email=sender.send)
        notify(CredentialsInvalid(mailbox_id=box["id"], error="refused",
                                  detected_at=datetime.now(UTC)), deps)
    finally:
        controller.stop()
    [(rcpt, content)] = recorder.received
    assert rcpt == ["alice@example.com"]
    headers = content.split(b"\r\n\r\n", 1)[0].decode()
    [subject] = [line for line in headers.split("\r\n") if line.startswith("Subject:")]
    assert "Work Bcc: mallory@evil.example" in subject
    assert not any(line.lower().startswith("bcc:") for line in headers.split("\r\n"))


def test_user_add_refuses_an_email_with_a_line_break(env: dict[str, str],
                                                     conn: db.Connection) -> None:
    result = services.run_cli(["user", "add", "--email", "alice@example.com\r\nBcc: x@evil"], env)
    assert result.returncode == 2
    assert conn.execute("SELECT count(*) AS n FROM users").fetchone() == {"n": 0}
