"""Every CLI command given hostile values answers with one line and a stable exit code, never a
traceback: people paste anything, and scripts pass empty variables."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from mailferry import app, db
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.services.cli import main as cli_main

HOSTILE = {
    "empty": "",
    "long": "x" * 300,
    "crlf": "a\r\nb",
    "nul": "a\x00b",
    "negative": "-1",
    "not-a-number": "abc",
    "huge": "99999999999999999999",
    "sql": "'; DROP TABLE users; --",
    "unicode": "ünïcödé 名前 \u202e",
    "nan": "nan",
}

# Each command line with one slot, {}, for the hostile value.
COMMANDS = [
    ["user", "add", "--email", "{}"],
    ["user", "add", "--email", "new@example.com", "--name", "{}"],
    ["user", "add", "--email", "new2@example.com", "--capability", "{}"],
    ["user", "remove", "{}", "--yes"],
    *[["mailbox", "add", *[x for k, v in {
        "--owner": "ann@example.com", "--host": "imap.example.com", "--port": "993",
        "--security": "ssl", "--username": "ann", **{slot: "{}"}}.items() for x in (k, v)],
       "--password-stdin"]
      for slot in ("--owner", "--host", "--port", "--security", "--username", "--folders",
                   "--name", "--first-sync-days")],
    ["mailbox", "update", "{}", "--name", "x"],
    *[["mailbox", "update", "1", option, "{}"]
      for option in ("--host", "--port", "--security", "--username", "--name",
                     "--first-sync-days")],
    ["mailbox", "remove", "{}", "--yes"],
    ["mailbox", "remove", "1", "--batch", "{}"],
    ["mailbox", "check", "{}"],
    ["mailbox", "folders", "{}"],
    ["mailbox", "folders", "1", "--enable", "{}"],
    ["mailbox", "folders", "1", "--disable", "{}"],
    ["sync", "--mailbox", "{}"],
    ["sync", "--mailbox", "1", "--wait", "--timeout", "{}"],
    ["messages", "list", "--mailbox", "{}"],
    ["messages", "list", "--mailbox", "1", "--folder", "{}"],
    ["messages", "search", "--mailbox", "1", "{}"],
    ["messages", "search", "--mailbox", "1", "word", "--limit", "{}"],
    ["messages", "raw", "{}"],
    ["notifications", "list", "--user", "{}"],
    ["notifications", "pop", "--user", "{}"],
    ["dead-letters", "list", "--queue", "{}"],
    ["dead-letters", "list", "--limit", "{}"],
    ["dead-letters", "replay", "--queue", "{}"],
]

# Values that must be refused as bad usage (exit 2), whatever else is accepted.
MUST_REFUSE = [
    (["user", "add", "--email", "carol@example.com, attacker@evil.example"], ""),
    (["user", "add", "--email", "Carol <carol@example.com>"], ""),
    (["mailbox", "add", "--owner", "ann@example.com", "--host", "x" * 300, "--port", "993",
      "--security", "ssl", "--username", "ann", "--password-stdin"], "pw\n"),
    (["mailbox", "add", "--owner", "ann@example.com", "--host", "imap.example.com", "--port",
      "993", "--security", "ssl", "--username", "", "--password-stdin"], "pw\n"),
    (["mailbox", "add", "--owner", "ann@example.com", "--host", "imap example.com", "--port",
      "993", "--security", "ssl", "--username", "ann", "--password-stdin"], "pw\n"),
    (["mailbox", "add", "--owner", "ann@example.com", "--host", f"{'a' * 64}.example.com",
      "--port", "993", "--security", "ssl", "--username", "ann", "--password-stdin"], "pw\n"),
    (["mailbox", "add", "--owner", "ann@example.com", "--host", "imap.example.com", "--port",
      "-5", "--security", "ssl", "--username", "ann", "--password-stdin"], "pw\n"),
    (["mailbox", "add", "--owner", "ann@example.com", "--host", "imap.example.com", "--port",
      "993", "--security", "ssl", "--username", "ann", "--password-stdin"], "a\x00b\n"),
    (["mailbox", "update", "1", "--host", "x" * 300], ""),
    (["mailbox", "update", "1", "--username", " "], ""),
    (["mailbox", "remove", "1"], ""),  # no terminal and no --yes
    (["user", "remove", "ann@example.com"], ""),
]


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@pytest.fixture
def run(env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> object:
    """The CLI in this process (hundreds of runs in seconds): argv, stdin, the exit code."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    conn = db.connect(database_url, autocommit=True)
    app.add_user(conn, "ann@example.com")
    app.add_mailbox(conn, PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"])),
                    owner_email="ann@example.com", host="127.0.0.1", port=services.free_port(),
                    security="none", username="ann", password="secret")
    conn.close()

    def invoke(argv: list[str], stdin: str = "") -> Outcome:
        monkeypatch.setattr(sys, "argv", ["mailferry", *argv])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli_main.main()
        captured = capsys.readouterr()
        return Outcome(int(exited.value.code or 0), captured.out, captured.err)

    return invoke


def _assert_one_clean_line(outcome: Outcome, argv: list[str]) -> None:
    assert "Traceback" not in outcome.out + outcome.err, (argv, outcome)
    assert outcome.code in (0, 1, 2), (argv, outcome)
    if outcome.code:
        lines = outcome.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mailferry: error: "), (argv, outcome)
        assert lines[0].isprintable(), (argv, outcome)


def test_every_command_answers_hostile_values_with_one_line_and_a_stable_code(run: object) -> None:
    invoke = run
    refused = 0
    for argv in COMMANDS:
        for value in HOSTILE.values():
            args = [value if a == "{}" else a for a in argv]
            outcome = invoke(args, "secret\n")  # type: ignore[operator]
            _assert_one_clean_line(outcome, args)
            refused += outcome.code == 2
    assert refused > len(COMMANDS) * 3  # most hostile values are refused, not stored


def test_values_that_must_be_refused_exit_2_and_store_nothing(run: object,
                                                              conn: db.Connection) -> None:
    invoke = run
    before = conn.execute("SELECT (SELECT count(*) FROM users) AS u, "
                          "(SELECT count(*) FROM mailboxes) AS m").fetchone()
    for argv, stdin in MUST_REFUSE:
        outcome = invoke(argv, stdin)  # type: ignore[operator]
        _assert_one_clean_line(outcome, argv)
        assert outcome.code == 2, (argv, outcome)
    after = conn.execute("SELECT (SELECT count(*) FROM users) AS u, "
                         "(SELECT count(*) FROM mailboxes) AS m").fetchone()
    assert after == before
    assert conn.execute("SELECT host, username FROM mailboxes").fetchall() == [
        {"host": "127.0.0.1", "username": "ann"}]


def test_a_real_process_prints_no_traceback_for_a_host_that_was_stored_before_validation(
    env: dict[str, str], conn: db.Connection,
) -> None:
    box = PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"]))
    conn.execute("INSERT INTO users (email) VALUES ('ann@example.com')")
    conn.execute(
        """INSERT INTO mailboxes (owner_id, name, host, port, security, username,
                                  password_encrypted) VALUES (1, 'old', %s, 993, 'ssl', '', %s)""",
        ("h" * 300, box.encrypt("pw")))
    result = services.run_cli(["mailbox", "check", "1"], env)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    assert "stored host: must be 1 to 253 characters long" in stderr
