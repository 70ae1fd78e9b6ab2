"""A server holding one message for alice, and a mailbox added for it through the CLI with a given
password: the bad settings of tests/integration/test_bad_input.py and tests/e2e/test_bad_sync.py.
A plugin of tests/conftest.py, so the fixture is everywhere and the function importable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot


@pytest.fixture
def alice_server(tmp_path: Path) -> Iterator[Dovecot]:
    """A private Dovecot where alice (password "secret") has one message in INBOX."""
    with Dovecot(tmp_path / "dovecot") as dovecot:
        dovecot.add_user("alice", "secret")
        with dovecot.session("alice") as imap:
            imap.append("INBOX", b"Subject: hello\r\n\r\nhi\r\n")
        yield dovecot


def add_alice_mailbox(env: dict[str, str], host: str, port: int, password: str) -> int:
    assert services.run_cli(["user", "add", "--email", "alice@example.com"], env).returncode == 0
    added = services.run_cli(
        ["mailbox", "add", "--owner", "alice@example.com", "--host", host, "--port", str(port),
         "--security", "none", "--username", "alice", "--password-stdin"],
        env, stdin=password.encode() + b"\n",
    )
    assert added.returncode == 0, added.stderr
    return int(json.loads(added.stdout)["id"])
