"""`mailferry mailbox import`: many mailboxes from one JSON Lines file, all or none, against the
real CLI and PostgreSQL. A file holds passwords and OAuth2 refresh tokens: no answer may ever
show one."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mailferry import app, db, oauth
from mailferry.app import oauth as app_oauth
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.oauth_provider import FakeProvider

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
    for token in _refresh_tokens(lines):
        assert token.encode() not in shown, "a refresh token was printed"
    return result


def _refresh_tokens(lines: list[str]) -> list[str]:
    tokens = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError):  # not JSON, or no token
            tokens.append(json.loads(line)["refresh_token"])
    return tokens


def _mailboxes(conn: db.Connection) -> list[dict[str, Any]]:
    return conn.execute(
        """SELECT m.id, u.email AS owner, m.name, m.host, m.port, m.security, m.username,
                  m.password_encrypted, m.initial_folders, m.first_sync_days
             FROM mailboxes m LEFT JOIN users u ON u.id = m.owner_id ORDER BY m.id""").fetchall()


def _tokens(conn: db.Connection) -> list[dict[str, Any]]:
    return conn.execute(
        """SELECT t.mailbox_id, p.name AS provider, t.refresh_token_encrypted
             FROM oauth_tokens t JOIN oauth_providers p ON p.id = t.provider_id
            ORDER BY t.mailbox_id""").fetchall()


@pytest.fixture
def owner(conn: db.Connection) -> int:
    return app.add_user(conn, OWNER)


@pytest.fixture
def box(secret_key: str) -> PasswordBox:
    return PasswordBox(SecretStr(secret_key))


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


def test_oauth2_and_app_only_lines_register_with_their_token_rows_encrypted(
    env: dict[str, str], conn: db.Connection, owner: int, box: PasswordBox, tmp_path: Path,
) -> None:
    with FakeProvider() as idp:
        app_oauth.add_provider(conn, box, name="Corp", kind="generic", client_id=idp.client_id,
                               token_url=f"{idp.url}/token")
        app_oauth.add_provider(conn, box, name="tenant", kind="microsoft", client_id="sync",
                               client_secret="the-client-secret")
        token = idp.grant("ann@corp.example")
        lines = [
            _line(password=None, auth="oauth2", oauth_provider="corp", refresh_token=token,
                  preset="gmail", host=None, port=None, security=None,
                  username="ann@corp.example"),
            _line(password=None, auth="oauth2-app", oauth_provider="tenant", preset="outlook",
                  host=None, port=None, security=None, owner=None, system=True,
                  username="support@corp.example", folders=["INBOX"]),
            _line(),  # a password line in the same file
        ]
        result = _import(env, lines, tmp_path)

        assert result.returncode == 0, result.stderr.decode()
        ids = json.loads(result.stdout)["ids"]
        kinds = conn.execute("SELECT id, auth_kind, host, port, security, initial_folders, "
                             "password_encrypted FROM mailboxes ORDER BY id").fetchall()
        assert [(k["id"], k["auth_kind"], k["host"], k["port"], k["security"]) for k in kinds] == [
            (ids[0], "oauth2", "imap.gmail.com", 993, "ssl"),
            (ids[1], "oauth2-app", "outlook.office365.com", 993, "ssl"),
            (ids[2], "password", "imap.example.com", 993, "ssl")]
        assert kinds[1]["initial_folders"] == ["INBOX"]
        assert bytes(kinds[0]["password_encrypted"]) == b"" == bytes(kinds[1]["password_encrypted"])
        user, app_only = _tokens(conn)  # the password mailbox has no token row
        assert (user["mailbox_id"], user["provider"]) == (ids[0], "Corp")
        assert token.encode() not in bytes(user["refresh_token_encrypted"])
        assert box.decrypt(user["refresh_token_encrypted"]) == token
        assert (app_only["mailbox_id"], app_only["provider"]) == (ids[1], "tenant")
        assert app_only["refresh_token_encrypted"] is None
        # The imported token row is one the token life cycle works with: it gets an access token.
        assert oauth.MailboxTokens(conn, box, ids[0])() in idp.issued


def test_an_oauth2_line_with_a_wrong_provider_or_credential_refuses_the_whole_file(
    env: dict[str, str], conn: db.Connection, owner: int, box: PasswordBox, tmp_path: Path,
) -> None:
    app_oauth.add_provider(conn, box, name="corp", kind="google", client_id="c")  # no secret
    token = "1//refresh-token-never-shown"
    oauth2 = {"password": None, "auth": "oauth2", "oauth_provider": "corp",
              "refresh_token": token}
    lines = [
        _line(**oauth2),
        _line(**{**oauth2, "password": SECRET}),
        _line(**{**oauth2, "refresh_token": None}),
        _line(**{**oauth2, "auth": "oauth2-app"}),  # a refresh token on an app-only line
        _line(**{**oauth2, "oauth_provider": None}),
        _line(refresh_token=token),  # on a password line
        _line(password=None),
        _line(auth="kerberos"),
    ]
    result = _import(env, lines, tmp_path)

    assert result.returncode == 2, result.stderr.decode()
    error = result.stderr.decode()
    for expected in ("line 2: password: an \"auth\": \"oauth2\" mailbox signs in with OAuth2",
                     "line 3: refresh_token: missing", "line 4: refresh_token: an \"auth\": "
                     "\"oauth2-app\" mailbox has no refresh token", "line 5: oauth_provider: missing",
                     "line 6: refresh_token: only an \"auth\": \"oauth2\" mailbox",
                     "line 7: password: missing", "line 8: auth: input should be"):
        assert expected in error, error
    assert "line 1" not in error
    assert _mailboxes(conn) == [] and _tokens(conn) == []

    # Providers are checked with the owners, once the lines are well formed: still before
    # anything is written. App-only access needs a provider that can act alone.
    result = _import(env, [_line(**oauth2), _line(**{**oauth2, "oauth_provider": "nope"}),
                           _line(**{**oauth2, "refresh_token": None, "auth": "oauth2-app"})],
                     tmp_path)
    assert result.returncode == 2
    error = result.stderr.decode()
    assert "line 2: oauth_provider: no OAuth2 provider named 'nope'" in error, error
    assert "line 3: oauth_provider: provider corp has no client secret" in error, error
    assert _mailboxes(conn) == [] and _tokens(conn) == []
