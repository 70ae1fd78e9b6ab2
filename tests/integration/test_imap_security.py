"""Connecting with ssl, starttls and none against a real Dovecot: certificates are verified, and
a configured STARTTLS is never silently dropped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry import imap
from mailferry.devkit.dovecot import Dovecot
from mailferry.errors import ImapAddressRefused, ImapAuthError, ImapConnectionError, ImapTlsError
from mailferry.imap import connector_factory


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    with Dovecot(tmp_path_factory.mktemp("tls"), ssl=True) as server:
        server.add_user("alice", "secret")
        yield server


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    with Dovecot(tmp_path_factory.mktemp("plain")) as server:
        server.add_user("alice", "secret")
        yield server


def _config(server: Dovecot, security: imap.Security, *, port: int | None = None,
            ca_file: Path | None = None, password: str = "secret") -> imap.ImapConfig:
    return imap.ImapConfig(host=server.host, port=port or server.port, security=security,
                           username="alice", password=password, timeout=10, ca_file=ca_file,
                           allow_private_networks=True)


def _logs_in(config: imap.ImapConfig) -> bool:
    with connector_factory.create_imap_connector(config) as connector:
        return bool(connector.client.list_folders())


def test_implicit_tls_with_the_servers_ca_logs_in(tls_server: Dovecot) -> None:
    assert _logs_in(_config(tls_server, "ssl", port=tls_server.ssl_port, ca_file=tls_server.ca_file))


def test_starttls_with_the_servers_ca_logs_in(tls_server: Dovecot) -> None:
    assert _logs_in(_config(tls_server, "starttls", ca_file=tls_server.ca_file))


def test_a_certificate_from_an_unknown_ca_is_refused(tls_server: Dovecot) -> None:
    with pytest.raises(ImapTlsError, match="certificate not trusted"):
        _logs_in(_config(tls_server, "ssl", port=tls_server.ssl_port))


def test_starttls_is_refused_rather_than_downgraded_when_the_server_lacks_it(
    plain_server: Dovecot,
) -> None:
    with pytest.raises(ImapTlsError, match="does not offer it"):
        _logs_in(_config(plain_server, "starttls"))


def test_implicit_tls_against_a_plain_port_says_so(plain_server: Dovecot) -> None:
    with pytest.raises((ImapTlsError, ImapConnectionError), match=r"TLS|greeting"):
        _logs_in(_config(plain_server, "ssl"))


def test_a_plain_connection_to_a_tls_port_fails_with_a_clear_error(tls_server: Dovecot) -> None:
    with pytest.raises(ImapConnectionError):
        _logs_in(_config(tls_server, "none", port=tls_server.ssl_port))


def test_a_refused_password_is_an_authentication_error(plain_server: Dovecot) -> None:
    with pytest.raises(ImapAuthError, match="login refused for user 'alice'"):
        _logs_in(_config(plain_server, "none", password="wrong"))


def test_without_the_private_network_setting_a_loopback_server_is_refused(
    plain_server: Dovecot,
) -> None:
    config = _config(plain_server, "none").model_copy(update={"allow_private_networks": False})
    with pytest.raises(ImapAddressRefused, match=r"127\.0\.0\.1 is loopback, not a public address"):
        _logs_in(config)
