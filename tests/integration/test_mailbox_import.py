"""`mailferry mailbox import`: many mailboxes from one JSON Lines file, all or none, against the
real CLI and PostgreSQL. A file holds passwords: no answer may ever show one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mailferry import app, db
from mailferry.crypto import PasswordBox
from mailferry.devkit import services

OWNER = "ann@example.com"
SECRET = "s3cret-never-shown"


def _line(**fields: Any) -> str:
    base: dict[str, Any] = {"owner": OWNER, "host": "imap.example.com", "port": 993,
                            "security": "ssl", "username": "ann", "password": SECRET}
    return json.dumps({k: v for k, v in {**base, **fields}.items() if v is not None})


def _import(env: dict[str, str], lines: list[str], tmp_path: Path,
            stdin: bool = False) -> subprocess.CompletedProcess[bytes]:
    data = ("\n".join(lines) + "\n").encode()
    if stdin:
        result = services.run_cli(["mailbox", "import", "-"], env, stdin=data)
    else:
        path = tmp_path / "mailboxes.jsonl"
        path.write_bytes(data)
        result = services.run_cli(["mailbox", "import", str(path)], env)
    shown = result.stdout + result.stderr
    assert SECRET.encode() not in shown, "a password was printed"
    return result


def _mailboxes(conn: db.Connection) -> list[dict[str, Any]]:
    return conn.execute(
        """SELECT m.id, u.email AS owner, m.name, m.host, m.port, m.security, m.username,
                  m.password_encrypted, m.initial_folders, m.first_sync_days
             FROM mailboxes m LEFT JOIN users u ON u.id = m.owner_id ORDER BY m.id""").fetchall()


@pytest.fixture
def owner(conn: db.Connection) -> int:
    return app.add_user(conn, OWNER)


def test_a_valid_file_registers_every_mailbox_as_mailbox_add_would(
    env: dict[str, str], conn: db.Connection, owner: int, secret_key: str, tmp_path: Path,
) -> None:
    lines = [
        _line(folders=["INBOX", "Projets/Été"], first_sync_days=30),
        "",  # blank lines are skipped
        _line(owner=None, system=True, username="shared", host="10.0.0.5", port=143,
              security="starttls", folders="INBOX, Sent", name="Support desk"),
        _line(owner="ANN@example.com", username="ann2"),
    ]
    result = _import(env, lines, tmp_path, stdin=True)

    assert result.returncode == 0, result.stderr.decode()
    ids = json.loads(result.stdout)["ids"]
    rows = _mailboxes(conn)
    assert ids == [r["id"] for r in rows] and len(ids) == 3
    first, system, third = rows
    assert (first["owner"], first["name"], first["initial_folders"], first["first_sync_days"]) == (
        OWNER, "ann@imap.example.com", ["INBOX", "Projets/Été"], 30)
    assert (system["owner"], system["name"], system["host"], system["port"], system["security"],
            system["initial_folders"]) == (None, "Support desk", "10.0.0.5", 143, "starttls",
                                           ["INBOX", "Sent"])
    assert third["owner"] == OWNER and third["initial_folders"] is None
    box = PasswordBox(SecretStr(secret_key))
    assert {box.decrypt(r["password_encrypted"]) for r in rows} == {SECRET}


def test_one_bad_line_imports_nothing_and_every_error_names_its_line_and_field(
    env: dict[str, str], conn: db.Connection, owner: int, tmp_path: Path,
) -> None:
    lines = [
        _line(),
        _line(port=99999),
        _line(owner="nobody@example.com"),
        _line(password=SECRET + "\r\n"),  # cannot log in: IMAP sends it on a command line
        '{"owner": "ann@example.com", "host": ',  # cut short
        _line(pasword="typo"),
        _line(system=True),  # and an owner: which one?
    ]
    result = _import(env, lines, tmp_path)

    assert result.returncode == 2, result.stderr.decode()
    error = result.stderr.decode()
    for expected in ("line 2: port:", "line 4: password:", "line 5: not valid JSON",
                     "line 6: pasword: unknown field", 'line 7: give exactly one of "owner"'):
        assert expected in error, error
    assert _mailboxes(conn) == []

    # The owners are checked once the lines are well formed, still before anything is written.
    result = _import(env, [_line(), _line(owner="nobody@example.com")], tmp_path)
    assert result.returncode == 2
    assert "line 2: owner: no user with email nobody@example.com" in result.stderr.decode()
    assert _mailboxes(conn) == []


def test_duplicates_are_registered_again_as_mailbox_add_run_twice_would(
    env: dict[str, str], conn: db.Connection, owner: int, tmp_path: Path,
) -> None:
    added = services.cli(env, "mailbox", "add", "--owner", OWNER, "--host", "imap.example.com",
                         "--port", "993", "--security", "ssl", "--username", "ann",
                         "--password-stdin", stdin=f"{SECRET}\n".encode())["id"]
    result = _import(env, [_line(), _line()], tmp_path)

    assert result.returncode == 0, result.stderr.decode()
    ids = json.loads(result.stdout)["ids"]
    assert len(set(ids)) == 2 and added not in ids
    assert [(r["host"], r["username"]) for r in _mailboxes(conn)] == [("imap.example.com", "ann")] * 3


def test_the_library_function_takes_a_host_applications_dicts_and_refuses_as_a_whole(
    conn: db.Connection, owner: int, secret_key: str,
) -> None:
    box = PasswordBox(SecretStr(secret_key))
    good = json.loads(_line())
    with pytest.raises(app.ImportRefused) as refused:
        app.import_mailboxes(conn, box, [good, {**good, "security": "tls"}, [1, 2]])
    assert [(e.line, e.field) for e in refused.value.errors] == [(2, "security"), (3, None)]
    assert SECRET not in str(refused.value) and SECRET not in repr(refused.value.errors)
    assert _mailboxes(conn) == []
    assert len(app.import_mailboxes(conn, box, [good, good])) == 2
