"""A watched server is untrusted input too: whatever it sends while watched (a response
dripped after IDLE's continuation, a dripped STATUS, a line that never ends), the watch gives up
within the IMAP boundary's limits, never stalls, never holds more than a line."""

from __future__ import annotations

import time

import pytest

from mailferry.devkit.hostile_imap import HostileImapServer
from mailferry.errors import ImapLimitExceeded, ImapTimeout
from mailferry.imap import ImapConfig, Limits
from mailferry.imap.connection import ImapConnector
from mailferry.imap.idle import PushSession

LIMITS = Limits(read_timeout=1.0, command_timeout=1.5, max_line_bytes=64 * 1024,
                max_response_bytes=1024 * 1024, max_literal_bytes=1024 * 1024)


def _session(server: HostileImapServer) -> PushSession:
    config = ImapConfig(server.host, server.port, "none", "alice", "pw", timeout=1.0,
                        allow_private_networks=True, limits=LIMITS)
    return PushSession(ImapConnector(config).connect(), ["INBOX", "Sent"], {}, poll=60,
                       renew=60)


def test_a_response_dripped_while_idling_is_cut_at_the_command_deadline() -> None:
    with HostileImapServer("idle_drip", extra_capabilities=["IDLE"], drip_interval=0.3) as server:
        session = _session(server)
        assert session.start() == set()
        assert session.mode == "idle"
        started = time.monotonic()
        with pytest.raises(ImapTimeout):
            while True:
                session.next_changes()
        assert time.monotonic() - started < 30, "cut by the deadline, not by the server giving up"
        session.connector.close()


@pytest.mark.parametrize(("behaviour", "error"), [("slow_drip", ImapTimeout),
                                                  ("long_line", ImapLimitExceeded)])
def test_a_watch_whose_status_poll_is_hostile_gives_up_within_the_limits(
    behaviour: str, error: type[Exception],
) -> None:
    with HostileImapServer(behaviour, extra_capabilities=["IDLE"], drip_interval=0.3,
                           long_line_bytes=1_000_000) as server:
        session = _session(server)
        started = time.monotonic()
        with pytest.raises(error):
            session.start()
        assert time.monotonic() - started < 30, "cut by the deadline, not by the server giving up"
        session.connector.close()
