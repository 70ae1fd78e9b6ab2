"""mailferry's IMAP layer against servers that misbehave on purpose (devkit/hostile_imap.py):
every hostile answer ends in a clear error of its own kind, within its deadline, with memory bounded
by the limits on the bytes received, never by what the server declared."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mailferry.devkit.hostile_imap import HostileImapServer
from mailferry.errors import ImapConnectionError, ImapLimitExceeded, ImapTimeout
from mailferry.imap import ImapConfig, Limits, SyncSession, connector_factory
from mailferry.messages import FolderInfo

INBOX = FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/")
MiB = 1024 * 1024


@contextmanager
def session(server: HostileImapServer, **limits: float) -> Iterator[SyncSession]:
    config = ImapConfig(server.host, server.port, "none", "alice", "pw", timeout=5,
                        allow_private_networks=True,
                        limits=Limits(**{"command_timeout": 3.0, **limits}))  # type: ignore[arg-type]
    with connector_factory.create_imap_connector(config) as connector:
        yield SyncSession(connector)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_slow_drip_is_cut_at_the_command_deadline() -> None:
    with HostileImapServer("slow_drip", drip_interval=0.2) as server, session(server) as s:
        started = time.monotonic()
        with pytest.raises(ImapTimeout, match="no complete answer within 3s"):
            s.list_folders()
        assert time.monotonic() - started < 5
        assert not s.connector.usable


def test_an_endless_list_ends_at_the_response_cap_with_memory_bounded() -> None:
    before = _peak_rss_mib()
    with (HostileImapServer("endless_list") as server,
          session(server, max_response_bytes=2 * MiB, command_timeout=60) as s,
          pytest.raises(ImapLimitExceeded, match="exceeded 2097152 bytes")):
        s.list_folders()
    assert _peak_rss_mib() - before < 120  # parsed LIST entries cost more than their bytes


def test_a_literal_far_larger_than_its_declared_size_is_dropped_not_held() -> None:
    before = _peak_rss_mib()
    with HostileImapServer("lying_size", messages=1, literal_bytes=80 * MiB) as server, \
            session(server, max_literal_bytes=16 * MiB, command_timeout=30) as s:
        s.select(INBOX)
        metas = s.metadata([1])
        bodies = s.bodies([1])
    assert metas[1].size == 100
    assert bodies[1].raw is None and bodies[1].size == 80 * MiB
    assert _peak_rss_mib() - before < 40


def test_a_folder_of_a_million_uids_is_searched_in_bounded_windows() -> None:
    before = _peak_rss_mib()
    with HostileImapServer("huge_folder", huge_uids=1_000_000) as server, \
            session(server, command_timeout=30) as s:
        status = s.select(INBOX)
        windows = list(s.iter_windows(1, status))
        sizes = [len(s.search(low, high)) for low, high in windows]
    assert sum(sizes) == 1_000_000
    assert max(sizes) <= s.window
    assert _peak_rss_mib() - before < 60


def test_a_garbage_literal_of_93_gib_ends_at_the_deadline() -> None:
    with HostileImapServer("garbage_literal", messages=1) as server, session(server) as s:
        s.select(INBOX)
        started = time.monotonic()
        with pytest.raises(ImapTimeout):
            s.bodies([1])
        assert time.monotonic() - started < 5


def test_a_disconnect_mid_literal_is_a_lost_connection() -> None:
    with HostileImapServer("disconnect_mid_literal", messages=1) as server, session(server) as s:
        s.select(INBOX)
        with pytest.raises(ImapConnectionError, match="connection lost"):
            s.bodies([1])


def test_a_bye_in_the_middle_of_a_command_is_a_lost_connection() -> None:
    with (HostileImapServer("bye_mid_command", messages=1) as server, session(server) as s,
          pytest.raises(ImapConnectionError, match="shutting down")):
        s.select(INBOX)


def test_a_line_that_never_ends_stops_at_the_line_cap() -> None:
    with (HostileImapServer("long_line") as server, session(server, max_line_bytes=1 * MiB) as s,
          pytest.raises(ImapLimitExceeded, match="line longer than 1048576 bytes")):
        s.list_folders()


def test_utf8_credentials_log_in_through_authenticate_plain() -> None:
    with HostileImapServer("healthy", messages=2, password="sécret") as server:
        config = ImapConfig(server.host, server.port, "none", "rené", "sécret", timeout=5,
                            allow_private_networks=True)
        with connector_factory.create_imap_connector(config) as connector:
            assert SyncSession(connector).select(INBOX).exists == 2
    assert any(c.upper().startswith("AUTHENTICATE PLAIN ") for c in server.commands)
