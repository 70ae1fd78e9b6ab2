"""How a password logs in (no I/O: a recording client): LOGIN carries a quoted user name and
refuses what no quoted string can carry; AUTHENTICATE PLAIN (RFC 4616) is preferred when offered,
and is the only way for UTF-8 credentials (tests/integration/test_imap_security.py shows both on a
real Dovecot, tests/integration/test_injection.py the LOGIN attack)."""

from __future__ import annotations

from typing import cast

import pytest
from imapclient import IMAPClient

from mailferry.errors import ConfigError
from mailferry.imap import ImapConfig, PasswordAuth


class _Recorder:
    """A server that offers no AUTH=PLAIN: the password goes by LOGIN."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def has_capability(self, name: str) -> bool:
        return False

    def login(self, username: str, password: str) -> None:
        self.calls.append((username, password))


def _login(username: str, password: str = "pw") -> list[tuple[str, str]]:
    client = _Recorder()
    config = ImapConfig(host="imap.example.com", port=993, security="ssl",
                        username=username, password=password)
    PasswordAuth().authenticate(cast(IMAPClient, client), config)
    return client.calls


@pytest.mark.parametrize(("username", "sent"), [
    ("alice", '"alice"'),
    ("John Smith", '"John Smith"'),
    ('a"b', '"a\\"b"'),
    ("dom\\user", '"dom\\\\user"'),
    ("{5}", '"{5}"'),
])
def test_the_user_name_is_sent_as_one_quoted_string(username: str, sent: str) -> None:
    assert _login(username) == [(sent, "pw")]


@pytest.mark.parametrize("username", ["a\r\nZ1 LOGOUT", "a\nb", "a\rb", "a\x00b"])
def test_a_user_name_with_a_line_break_or_nul_is_refused_before_anything_is_sent(
    username: str,
) -> None:
    with pytest.raises(ConfigError, match="line break or NUL"):
        _login(username)


def test_a_non_ascii_user_name_without_authenticate_plain_is_a_clear_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"not ASCII.*does not offer AUTHENTICATE PLAIN"):
        _login("café")


def test_a_refused_password_is_never_shown_in_the_error() -> None:
    with pytest.raises(ConfigError) as caught:
        _login("alice", "sécret\r\n")
    assert "sécret" not in str(caught.value)
