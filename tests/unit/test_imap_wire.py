"""The IMAP wire against canned server bytes (imapclient's testable-client style, over a socket
pair: no network). Responses are shaped like Dovecot's, Cyrus', Gmail's and Exchange's answers in
RFC 3501, RFC 4731 and RFC 7162 examples; the limits hold on the bytes actually received."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from mailferry.errors import ImapLimitExceeded, ImapTimeout
from mailferry.imap import wire
from mailferry.imap.search import SearchQueryBuilder
from mailferry.imap.wire import Limits

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN ESEARCH] Dovecot ready.\r\n"


class _Paired(wire.Client):
    """The bounded client on one end of a socket pair instead of a TCP connection."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self._pair_sock = sock
        super().__init__("imap.example.com", 143, targets=[], limits=limits, tls=None,
                         connect_timeout=5, where="imap.example.com:143")

    def _create_IMAP4(self) -> wire.BoundedIMAP4:
        sock = self._pair_sock

        class Engine(wire.BoundedIMAP4):
            def _create_socket(self, timeout: float | None = None) -> socket.socket:
                return sock

        return Engine(self.host, self.port, **self._bounded)


@contextmanager
def server(script: Sequence[bytes], limits: Limits | None = None, greeting: bytes = GREETING,
           state: str = "SELECTED") -> Iterator[tuple[_Paired, list[bytes]]]:
    """A peer that answers each client line with the next canned answer ("TAG" is replaced by the
    command's tag). Yields the client and the lines it sent."""
    ours, theirs = socket.socketpair()
    received: list[bytes] = []

    def run() -> None:
        with contextlib.suppress(OSError):  # the client closed its end
            theirs.sendall(greeting)
            reader = theirs.makefile("rb")
            for answer in script:
                line = reader.readline()
                if not line:
                    return
                received.append(line)
                theirs.sendall(answer.replace(b"TAG", line.split(b" ", 1)[0]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client = _Paired(ours, limits or Limits(read_timeout=5, command_timeout=5))
    if state != "NONAUTH":  # as after LOGIN (whose OK carried the capabilities) and SELECT
        wire.engine(client).state = state
        client._cached_capabilities = tuple(c.encode() for c in wire.engine(client).capabilities)
    try:
        yield client, received
    finally:
        ours.close()
        theirs.close()
        thread.join(timeout=5)


def test_the_greetings_capabilities_save_the_capability_round_trip() -> None:
    with server([], state="NONAUTH") as (client, sent):
        assert client.has_capability("ESEARCH")
    assert sent == []


def test_a_fetch_literal_comes_back_byte_exact_and_unsolicited_uids_are_dropped() -> None:
    body = b"Subject: hi\r\n\r\n{5}\r\nodd \"quoting\" \\ here\r\n"
    answer = (b"* 1 FETCH (UID 4 FLAGS (\\Seen) BODY[] {%d}\r\n" % len(body) + body + b")\r\n"
              b"* 2 FETCH (UID 9 FLAGS (\\Flagged))\r\nTAG OK Fetch completed.\r\n")
    with server([answer]) as (client, _):
        data = wire.uid_fetch(client, "4", ["BODY.PEEK[]"], wanted={4}.__contains__)
    assert list(data) == [4]
    assert data[4][b"BODY[]"] == body


def test_vanished_earlier_ranges_are_collected_from_a_qresync_fetch() -> None:
    answer = (b"* VANISHED (EARLIER) 41,43:116,118,120:211,214:540\r\n"
              b"* 49 FETCH (UID 117 FLAGS (\\Seen \\Answered) MODSEQ (90060115194045001))\r\n"
              b"TAG OK Fetch completed\r\n")  # RFC 7162 section 3.2.5.1's example
    with server([answer]) as (client, _):
        data = wire.uid_fetch(client, "1:540", ["FLAGS", "MODSEQ"],
                              ["CHANGEDSINCE 12345", "VANISHED"])
        ranges = wire.pop_vanished(client)
    assert ranges == [(41, 41), (43, 116), (118, 118), (120, 211), (214, 540)]
    assert data[117][b"MODSEQ"] == (90060115194045001,)


def test_an_esearch_answer_is_read_as_ranges_not_one_uid_per_word() -> None:
    answer = b'* ESEARCH (TAG "TAG") UID ALL 1:3,7,100000:100004\r\nTAG OK Search done\r\n'
    with server([answer]) as (client, sent):
        charset, pieces = SearchQueryBuilder().all().get().encode()
        found = wire.uid_search(client, pieces, charset, "x", esearch=True)
    assert found == [1, 2, 3, 7, 100000, 100001, 100002, 100003, 100004]
    assert sent[0].split(b" ", 1)[1] == b"UID SEARCH RETURN (ALL) ALL\r\n"


def test_a_search_value_with_a_line_break_goes_as_a_literal_plus() -> None:
    answer = b"* SEARCH 2 84 882\r\nTAG OK SEARCH completed\r\n"  # RFC 3501 6.4.4's example
    with server([answer, b""]) as (client, sent):
        charset, pieces = SearchQueryBuilder().subject("a\r\nb").get().encode()
        assert wire.uid_search(client, pieces, charset, "x") == [2, 84, 882]
    assert sent[0].endswith(b"SUBJECT {4+}\r\n")


def test_a_literal_over_the_limit_is_read_and_dropped_whatever_the_size_claimed() -> None:
    big = b"x" * 300_000
    answer = (b"* 1 FETCH (UID 1 RFC822.SIZE 100 BODY[] {%d}\r\n" % len(big) + big + b")\r\n"
              b"TAG OK done\r\n")
    limits = Limits(read_timeout=5, command_timeout=5, max_literal_bytes=100_000)
    with server([answer], limits) as (client, _):
        data = wire.uid_fetch(client, "1", ["RFC822.SIZE", "BODY.PEEK[]"])
    body = data[1][b"BODY[]"]
    assert isinstance(body, wire.SkippedLiteral)
    assert (body.size, bytes(body)) == (300_000, b"")


def test_a_line_longer_than_the_cap_ends_the_connection_with_a_clear_error() -> None:
    answer = b"* LIST (\\HasNoChildren) \"/\" " + b"x" * 200_000 + b"\r\nTAG OK done\r\n"
    limits = Limits(read_timeout=5, command_timeout=5, max_line_bytes=50_000)
    with server([answer], limits) as (client, _):
        with pytest.raises(ImapLimitExceeded, match="line longer than 50000 bytes"):
            client.list_folders()
        assert wire.broken(client)


def test_an_answer_larger_than_the_response_cap_ends_the_connection() -> None:
    lines = b"".join(b'* LIST () "/" "folder%d"\r\n' % i for i in range(5000))
    limits = Limits(read_timeout=5, command_timeout=5, max_response_bytes=20_000)
    with (server([lines + b"TAG OK done\r\n"], limits) as (client, _),
          pytest.raises(ImapLimitExceeded, match="exceeded 20000 bytes")):
        client.list_folders()


def test_a_slow_drip_is_cut_at_the_command_deadline_however_often_bytes_arrive() -> None:
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def drip() -> None:
        with contextlib.suppress(OSError):
            theirs.sendall(GREETING)
            theirs.recv(1024)
            while not stop.wait(0.1):
                theirs.sendall(b"*")

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    client = _Paired(ours, Limits(read_timeout=2, command_timeout=1.0))
    wire.engine(client).state = "AUTH"
    started = time.monotonic()
    try:
        with pytest.raises(ImapTimeout, match="no complete answer within 1s"):
            client.list_folders()
    finally:
        stop.set()
        ours.close()
        theirs.close()
        thread.join(timeout=5)
    assert time.monotonic() - started < 10  # the deadline, not the drip (endless) or a hang, ended it


def test_uid_sets_are_compressed_into_ranges() -> None:
    assert wire.uid_set([7, 1, 2, 3, 9, 8]) == "1:3,7:9"


EXCHANGE_GREETING = (b"* OK The Microsoft Exchange IMAP4 service is ready. "
                     b"[TQBXADIAUABSADAAMgBDAEEAMAAwADEANgAuAGUAdQByAHAAcgBkADAAMgAu]\r\n")


def test_a_greeting_without_capabilities_asks_for_them_once_as_exchange_needs() -> None:
    answer = (b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID "
              b"UNSELECT CHILDREN IDLE NAMESPACE LITERAL+\r\nTAG OK CAPABILITY completed.\r\n")
    with server([answer], greeting=EXCHANGE_GREETING, state="NONAUTH") as (client, sent):
        assert client.has_capability("AUTH=XOAUTH2")
        assert not client.has_capability("CONDSTORE")
    assert [line.split(b" ", 1)[1] for line in sent] == [b"CAPABILITY\r\n"]


def test_gmail_shaped_list_answers_give_names_flags_and_delimiters() -> None:
    answer = (b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n'
              b'* LIST (\\HasChildren \\Noselect) "/" "[Gmail]"\r\n'
              b'* LIST (\\All \\HasNoChildren) "/" "[Gmail]/All Mail"\r\n'
              b'* LIST (\\HasNoChildren \\Sent) "/" "[Gmail]/Sent Mail"\r\n'
              b'* LIST (\\HasNoChildren) "/" {18}\r\nProjets/\xc3\xa9t\xc3\xa9 2026\r\n'
              b"TAG OK Success\r\n")
    with server([answer], state="AUTH") as (client, _):
        listed = client.list_folders()
    names = [name for _, _, name in listed]
    assert names[:4] == [b"INBOX", b"[Gmail]", b"[Gmail]/All Mail", b"[Gmail]/Sent Mail"]
    assert names[4] == "Projets/été 2026".encode()  # a literal name, 8-bit as some servers send
    assert listed[1][0] == (b"\\HasChildren", b"\\Noselect")
    assert listed[3][1] == b"/"


def test_cyrus_shaped_fetch_items_in_any_order_with_a_literal_in_the_middle() -> None:
    body = b"From: a@example.org\r\n\r\nbody\r\n"
    answer = (b"* 12 FETCH (FLAGS (\\Seen $Label1) BODY[] {%d}\r\n" % len(body) + body
              + b" UID 812 INTERNALDATE \"30-Nov-2026 05:00:00 +0100\" RFC822.SIZE %d)\r\n"
              % len(body) + b"TAG OK Completed (0.001 sec)\r\n")
    with server([answer]) as (client, _):
        data = wire.uid_fetch(client, "812", ["FLAGS", "BODY.PEEK[]", "INTERNALDATE",
                                                "RFC822.SIZE"], wanted={812}.__contains__)
    assert data[812][b"BODY[]"] == body
    assert data[812][b"FLAGS"] == (b"\\Seen", b"$Label1")
    assert data[812][b"RFC822.SIZE"] == len(body)
    assert data[812][b"INTERNALDATE"].utcoffset().total_seconds() == 3600


def test_data_sent_in_clear_text_after_a_starttls_ok_ends_the_connection() -> None:
    injected = b"TAG OK Begin TLS negotiation now\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN]\r\n"
    with server([injected], state="NONAUTH",
                greeting=b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n") as (client, _):
        with pytest.raises(Exception, match="clear text after STARTTLS"):
            wire.engine(client).starttls(ssl.create_default_context())
        assert wire.broken(client)


def test_a_tls_handshake_dripped_byte_by_byte_is_cut_at_the_command_deadline() -> None:
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def drip() -> None:
        with contextlib.suppress(OSError):
            theirs.recv(4096)  # the ClientHello
            theirs.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record, announced
            while not stop.wait(0.1):
                theirs.sendall(b"\x00")  # and never finished

    class Engine(wire.BoundedIMAP4):
        def _create_socket(self, timeout: float | None = None) -> socket.socket:
            return self._handshake(ours, ssl.create_default_context())

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(ImapTimeout, match="no complete answer within 1s"):
            Engine("imap.example.com", 993, targets=[],
                   limits=Limits(read_timeout=5, command_timeout=1.0),
                   tls=ssl.create_default_context(), connect_timeout=5,
                   where="imap.example.com:993")
    finally:
        stop.set()
        ours.close()
        theirs.close()
    assert time.monotonic() - started < 10  # the deadline ended it; the drip alone never would
