"""The hostile fake IMAP server does what it says, proven with plain sockets (and imapclient).

Other tests lean on it to prove that mailferry's IMAP layer survives hostile servers, so each
misbehaviour is pinned here by what a client can observe: bytes per second, literal sizes, line
lengths, what arrives before the socket closes.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from email import message_from_bytes
from email.policy import default as default_policy

import imapclient
import pytest
from imapclient.exceptions import LoginError

from mailferry.devkit.hostile_imap import (
    DEFAULT_DATE,
    FolderSpec,
    HostileImapServer,
    MiB,
)

pytestmark = pytest.mark.timeout(60)

_TIMEOUT = 5.0


class RawClient:
    """A line-level IMAP client over a plain socket: it sees exactly what the server sends."""

    def __init__(self, server: HostileImapServer, timeout: float = _TIMEOUT) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self._buf = bytearray()
        self.greeting = self.readline()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        self.sock.sendall(data + b"\r\n")

    def _fill(self) -> bool:
        data = self.sock.recv(256 * 1024)
        self._buf += data
        return bool(data)

    def readline(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if not self._fill():
                raise EOFError(bytes(self._buf[:200]))
        line = bytes(self._buf[:end + 2])
        del self._buf[:end + 2]
        return line

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise EOFError(f"{len(self._buf)} of {n} bytes")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def recv_into(self, buffer: memoryview, limit: int) -> int:
        """Reads at most ``limit`` bytes into ``buffer`` (what is buffered first); 0 at EOF."""
        if self._buf:
            n = min(limit, len(self._buf))
            buffer[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        return self.sock.recv_into(buffer, limit)

    def read_chunks(self) -> Iterator[bytes]:
        """Everything until the server closes, chunk by chunk (never held whole)."""
        if self._buf:
            yield bytes(self._buf)
            self._buf.clear()
        while data := self.sock.recv(1 * MiB):
            yield data

    def command(self, tag: str, text: str) -> list[bytes]:
        """Sends a command and returns the lines up to its tagged completion (no literals)."""
        self.send(f"{tag} {text}")
        lines = []
        while True:
            line = self.readline()
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines

    def login(self) -> None:
        assert self.command("a0", "LOGIN user secret")[-1].startswith(b"a0 OK")


def _wait_for_no_connections(server: HostileImapServer, within: float = 5.0) -> float:
    """Seconds until every connection thread of the server ended (fails past ``within``)."""
    start = time.monotonic()
    while server.active_connections:
        assert time.monotonic() - start < within, "the server kept a connection thread running"
        time.sleep(0.02)
    return time.monotonic() - start


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


# -- healthy ------------------------------------------------------------------------------------


def test_imapclient_logs_in_lists_selects_searches_and_fetches_bodies_byte_exact() -> None:
    with HostileImapServer() as server:
        client = imapclient.IMAPClient(server.host, server.port, ssl=False, timeout=_TIMEOUT)
        client.login("alice", "anything")
        folders = {name: flags for flags, _, name in client.list_folders()}
        info = client.select_folder("INBOX", readonly=True)
        uids = client.search(["ALL"])
        fetched = client.fetch(uids[:3], ["UID", "RFC822.SIZE", "BODY.PEEK[]", "BODY.PEEK[]<10.20>"])
        client.logout()

    assert folders == {"INBOX": (b"\\HasNoChildren",), "Sent": (b"\\HasNoChildren", b"\\Sent"),
                       "Archive": (b"\\HasChildren",), "Archive/2023": (b"\\HasNoChildren",)}
    assert (info[b"EXISTS"], info[b"UIDVALIDITY"], info[b"UIDNEXT"]) == (10, 1, 11)
    assert uids == list(range(1, 11))
    for uid in (1, 2, 3):
        body = server.message("INBOX", uid)
        assert fetched[uid][b"BODY[]"] == body
        assert fetched[uid][b"RFC822.SIZE"] == len(body)
        assert fetched[uid][b"BODY[]<10>"] == body[10:30]  # partial fetch, RFC 3501 6.4.5
        assert f"Message-ID: <{uid}.1@hostile.invalid>".encode() in body
    assert server.commands[-3:] == [
        "UID SEARCH ALL",
        "UID FETCH 1,2,3 (UID RFC822.SIZE BODY.PEEK[] BODY.PEEK[]<10.20>)",
        "LOGOUT",
    ]
    assert server.connections == 1


def test_imapclient_authenticates_with_plain_and_a_password_is_checked_when_set() -> None:
    with HostileImapServer(password="right") as server:
        client = imapclient.IMAPClient(server.host, server.port, ssl=False, timeout=_TIMEOUT)
        client.plain_login("alice", "right")
        assert client.select_folder("Sent")[b"EXISTS"] == 3
        client.logout()
        for login in ("login", "plain_login"):
            client = imapclient.IMAPClient(server.host, server.port, ssl=False, timeout=_TIMEOUT)
            with pytest.raises(LoginError, match="AUTHENTICATIONFAILED"):
                getattr(client, login)("alice", "wrong")
            client.shutdown()
    assert server.commands.count("AUTHENTICATE PLAIN") == 2


def test_authenticate_plain_takes_a_sasl_ir_initial_response_only_when_advertised() -> None:
    initial = base64.b64encode(b"\0alice\0pw").decode()
    with HostileImapServer() as server, RawClient(server) as raw:
        assert b"SASL-IR" in raw.greeting and b"AUTH=PLAIN" in raw.greeting
        assert raw.command("a1", f"AUTHENTICATE PLAIN {initial}")[-1].startswith(b"a1 OK")
    without_ir = ("IMAP4rev1", "AUTH=PLAIN")
    with HostileImapServer(capabilities=without_ir) as server, RawClient(server) as raw:
        assert raw.command("a1", f"AUTHENTICATE PLAIN {initial}")[-1].startswith(b"a1 BAD")
        raw.send("a2 AUTHENTICATE PLAIN")
        assert raw.readline() == b"+ \r\n"
        raw.send(initial)
        assert raw.readline().startswith(b"a2 OK")
    with HostileImapServer(capabilities=("IMAP4rev1",)) as server, RawClient(server) as raw:
        assert raw.command("a1", "AUTHENTICATE PLAIN")[-1].startswith(b"a1 NO")


def test_a_synchronizing_literal_gets_a_continuation_and_literal_plus_does_not() -> None:
    with HostileImapServer(password="p w") as server, RawClient(server) as raw:
        raw.send("a1 LOGIN {5}")
        assert raw.readline().startswith(b"+ ")
        raw.send(b"alice {3+}\r\np w")
        assert raw.readline().startswith(b"a1 OK")
    assert server.commands == ["LOGIN {5}\r\nalice {3+}\r\np w"]


def test_esearch_answers_with_a_compressed_uid_set() -> None:
    folders = {"INBOX": FolderSpec(uids=[1, 2, 3, 4, 5, 7, 9])}
    with HostileImapServer(folders=folders) as server, RawClient(server) as raw:
        raw.login()
        raw.command("a1", "EXAMINE INBOX")
        assert raw.command("x", "UID SEARCH RETURN (ALL) UID 1:7") == [
            b'* ESEARCH (TAG "x") UID ALL 1:5,7\r\n', b"x OK SEARCH completed\r\n"]
        assert raw.command("y", "UID SEARCH RETURN (MIN MAX COUNT) ALL")[0] == \
            b'* ESEARCH (TAG "y") UID MIN 1 MAX 9 COUNT 7\r\n'
        assert raw.command("z", "UID SEARCH RETURN () UID 100:200")[0] == \
            b'* ESEARCH (TAG "z") UID\r\n'
        assert raw.command("w", "SEARCH RETURN (ALL) UID 7:9")[0] == b'* ESEARCH (TAG "w") ALL 6:7\r\n'


def test_search_ands_uid_sets_with_dates_compared_by_day() -> None:
    def date_of(uid: int) -> datetime:
        return DEFAULT_DATE + timedelta(days=uid)  # UID 1 on 16-Jan-2024, UID 10 on 25-Jan

    folders = {"INBOX": FolderSpec(uids=range(1, 11), internal_date=date_of)}
    with HostileImapServer(folders=folders) as server, RawClient(server) as raw:
        raw.login()
        raw.command("a1", "SELECT INBOX")
        assert raw.command("a2", "UID SEARCH SINCE 20-Jan-2024")[0] == b"* SEARCH 5 6 7 8 9 10\r\n"
        assert raw.command("a3", 'UID SEARCH UID 1:7 SINCE "20-Jan-2024"')[0] == b"* SEARCH 5 6 7\r\n"
        assert raw.command("a4", "UID SEARCH UID 2,4:* BEFORE 19-Jan-2024")[0] == b"* SEARCH 2\r\n"
        assert raw.command("a5", "UID SEARCH UID 3 SINCE 1-Feb-2024")[0] == b"* SEARCH\r\n"
        assert raw.command("a6", "UID SEARCH FLAGGED")[-1].startswith(b"a6 BAD")


def test_sequence_numbers_follow_the_uids_of_a_sparse_folder() -> None:
    folders = {"INBOX": FolderSpec(uids=[3, 7, 10], uidvalidity=42)}
    with HostileImapServer(folders=folders) as server, RawClient(server) as raw:
        raw.login()
        raw.command("a1", "SELECT INBOX")
        assert raw.command("a2", "UID FETCH 7:* (FLAGS)")[:2] == [
            b"* 2 FETCH (UID 7 FLAGS ())\r\n", b"* 3 FETCH (UID 10 FLAGS ())\r\n"]
        assert raw.command("a3", "FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 3)\r\n"
        assert raw.command("a4", "SEARCH UID 7:10")[0] == b"* SEARCH 2 3\r\n"


def test_highestmodseq_is_reported_only_when_condstore_is_advertised() -> None:
    with HostileImapServer() as server, RawClient(server) as raw:
        raw.login()
        assert not any(b"HIGHESTMODSEQ" in line for line in raw.command("a1", "SELECT INBOX"))
    folders = {"INBOX": FolderSpec(uids=range(1, 4), uidvalidity=7, modseqs={2: 30})}
    with HostileImapServer(folders=folders, extra_capabilities=["CONDSTORE"]) as server, \
            RawClient(server) as raw:
        raw.login()
        assert raw.command("a1", "ENABLE CONDSTORE")[0] == b"* ENABLED CONDSTORE\r\n"
        assert raw.command("a2", "STATUS INBOX (UIDVALIDITY UIDNEXT MESSAGES HIGHESTMODSEQ)")[0] \
            == b'* STATUS "INBOX" (UIDVALIDITY 7 UIDNEXT 4 MESSAGES 3 HIGHESTMODSEQ 30)\r\n'
        assert b"* OK [HIGHESTMODSEQ 30] Highest\r\n" in raw.command("a3", "SELECT INBOX")
        assert raw.command("a4", "UID FETCH 1:* (FLAGS MODSEQ) (CHANGEDSINCE 5)") == [
            b"* 2 FETCH (UID 2 FLAGS () MODSEQ (30))\r\n", b"a4 OK FETCH completed\r\n"]


def test_unknown_commands_get_bad_and_logout_says_bye_then_ok() -> None:
    with HostileImapServer() as server, RawClient(server) as raw:
        assert raw.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN "
                                       b"ESEARCH NAMESPACE ENABLE]")
        assert raw.command("a1", "XYZZY")[-1].startswith(b"a1 BAD")
        assert raw.command("a2", "SELECT INBOX")[-1].startswith(b"a2 BAD")  # not logged in
        raw.login()
        assert raw.command("a3", "NOOP") == [b"a3 OK NOOP completed\r\n"]
        assert raw.command("a4", "NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
        assert raw.command("a5", "SELECT Nowhere")[-1].startswith(b"a5 NO [NONEXISTENT]")
        assert raw.command("a6", "LOGOUT") == [b"* BYE logging out\r\n", b"a6 OK LOGOUT completed\r\n"]
        assert list(raw.read_chunks()) == []


def test_connections_and_commands_are_recorded_across_concurrent_clients() -> None:
    with HostileImapServer() as server:
        def session(n: int) -> None:
            with RawClient(server) as raw:
                raw.login()
                for i in range(20):
                    raw.command(f"t{i}", f"NOOP {n}")

        threads = [threading.Thread(target=session, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        _wait_for_no_connections(server)
    assert server.connections == 4
    for n in range(4):
        assert server.commands.count(f"NOOP {n}") == 20


def test_an_unknown_behaviour_is_refused_and_messages_makes_an_inbox_of_uids_1_to_n() -> None:
    assert len(HostileImapServer.BEHAVIOURS) == 11
    with pytest.raises(ValueError, match="unknown behaviour"):
        HostileImapServer("sulking")
    with HostileImapServer(messages=250) as server, RawClient(server) as raw:
        raw.login()
        assert raw.command("a1", "STATUS INBOX (MESSAGES UIDNEXT)")[0] == \
            b'* STATUS "INBOX" (MESSAGES 250 UIDNEXT 251)\r\n'


def test_refuse_answers_the_chosen_command_with_the_providers_words_and_a_bye_closes() -> None:
    refusal = ("LOGIN", "{tag} NO [ALERT] Too many simultaneous connections. (Failure)")
    with HostileImapServer("refuse", refusal=refusal) as server, RawClient(server) as raw:
        answer = raw.command("a1", "LOGIN user secret")
        assert answer == [b"a1 NO [ALERT] Too many simultaneous connections. (Failure)\r\n"]
        assert raw.command("a2", "NOOP")[-1].startswith(b"a2 OK")  # the session goes on
    exchange = ("SELECT", "{tag} BAD Request is throttled. Suggested Backoff Time: 299961 "
                          "milliseconds\n* BYE Connection closed. 14")
    with HostileImapServer("refuse", refusal=exchange) as server, RawClient(server) as raw:
        raw.login()
        raw.send("a1 SELECT INBOX")
        assert raw.readline().startswith(b"a1 BAD Request is throttled.")
        assert raw.readline() == b"* BYE Connection closed. 14\r\n"
        with pytest.raises(EOFError):
            raw.readline()
    greeting = ("GREETING", "* BYE Too many connections from your address")
    with HostileImapServer("refuse", refusal=greeting) as server, RawClient(server) as raw:
        assert raw.greeting == b"* BYE Too many connections from your address\r\n"


# -- misbehaviours ------------------------------------------------------------------------------


def test_slow_drip_sends_one_byte_per_interval_and_never_completes() -> None:
    with HostileImapServer("slow_drip", drip_interval=0.2) as server:
        with RawClient(server) as raw:
            raw.login()  # login is answered at full speed
            raw.send('a1 LIST "" "*"')
            raw.sock.settimeout(0.5)  # each byte arrives well within a per-read timeout...
            received = bytearray()
            start = time.monotonic()
            while time.monotonic() - start < 2.0:
                received += raw.sock.recv(100)
        # ...but in 2 s at most 2 / 0.2 bytes (+ the first one, + scheduling slack) come in.
        assert 5 <= len(received) <= 12
        assert b'* LIST (\\HasNoChildren) "/" "INBOX"'.startswith(bytes(received))
        _wait_for_no_connections(server)  # the drip stops once the client left


def test_endless_list_streams_folders_until_the_client_leaves() -> None:
    with HostileImapServer("endless_list") as server:
        with RawClient(server) as raw:
            raw.login()
            raw.send('a1 LIST "" "*"')
            lines = [raw.readline() for _ in range(100_000)]
        pattern = re.compile(rb'\* LIST \(\\HasNoChildren\) "/" "folder(\d+)"\r\n\Z')
        numbers = [int(m[1]) for line in lines if (m := pattern.match(line))]
        assert numbers == list(range(100_000))  # every line a folder, never a tagged OK
        _wait_for_no_connections(server)


def test_lying_size_streams_an_80_mib_literal_after_claiming_100_bytes() -> None:
    size = 80 * MiB
    with HostileImapServer("lying_size") as server, RawClient(server, timeout=10) as raw:
        raw.login()
        raw.command("a1", "SELECT INBOX")
        baseline = peak = _rss_kib()
        start = time.monotonic()
        raw.send("a2 UID FETCH 1 (UID RFC822.SIZE BODY.PEEK[])")
        assert raw.readline() == f"* 1 FETCH (UID 1 RFC822.SIZE 100 BODY[] {{{size}}}\r\n".encode()
        head = raw.read_exact(4096)
        left = size - len(head)
        # The client reads into one fixed buffer, so what grows would be the server's.
        buffer = memoryview(bytearray(256 * 1024))
        tail = b""
        reads = 0
        while left:
            n = raw.recv_into(buffer, min(left, len(buffer)))
            assert n, f"the server closed with {left} bytes of the literal missing"
            left -= n
            tail = (tail + bytes(buffer[max(0, n - 2):n]))[-2:]
            reads += 1
            if reads % 32 == 0:
                peak = max(peak, _rss_kib())
        assert raw.readline() == b")\r\n"
        assert raw.readline() == b"a2 OK FETCH completed\r\n"
        elapsed = time.monotonic() - start
    message = message_from_bytes(head, policy=default_policy)
    assert message["Subject"] == "Message 1"
    assert message["Message-ID"] == "<1.1@hostile.invalid>"
    assert tail == b"\r\n"
    # The literal is generated chunk by chunk: neither side ever held the 80 MiB.
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB while streaming 80 MiB"
    print(f"lying_size: 80 MiB in {elapsed:.2f} s, RSS growth {growth_mib:.1f} MiB")


def test_lying_size_literal_is_a_whole_rfc822_message_of_exactly_the_stated_size() -> None:
    size = 1 * MiB + 17  # not a multiple of the filler line: the padding header absorbs it
    with HostileImapServer("lying_size", literal_bytes=size) as server, RawClient(server) as raw:
        raw.login()
        raw.command("a1", "EXAMINE INBOX")
        raw.send("a2 UID FETCH 3 (RFC822.SIZE BODY.PEEK[] BODY.PEEK[]<0.100>)")
        assert raw.readline() == f"* 3 FETCH (UID 3 RFC822.SIZE 100 BODY[] {{{size}}}\r\n".encode()
        whole = raw.read_exact(size)
        assert raw.readline() == b" BODY[]<0> {100}\r\n"
        assert raw.read_exact(100) == whole[:100]
        assert raw.readline() == b")\r\n"
        assert raw.readline() == b"a2 OK FETCH completed\r\n"
    message = message_from_bytes(whole, policy=default_policy)
    assert message["Message-ID"] == "<3.1@hostile.invalid>"
    assert not message.defects
    payload = message.get_payload()
    assert isinstance(payload, str)
    lines = payload.splitlines(keepends=True)
    assert len(lines) > 10_000
    assert {len(line) for line in lines} == {78} and lines[0].startswith("filler ")


def test_huge_folder_answers_a_whole_range_search_in_one_line_of_a_million_uids() -> None:
    with HostileImapServer("huge_folder") as server, RawClient(server, timeout=10) as raw:
        raw.login()
        assert b"* 1000000 EXISTS\r\n" in raw.command("a1", "SELECT INBOX")
        raw.send("a2 UID SEARCH ALL")
        line = raw.readline()
        assert raw.readline() == b"a2 OK SEARCH completed\r\n"
        uids = line.split()[2:]
        assert len(line) > 6_000_000
        assert (len(uids), uids[0], uids[-1]) == (1_000_000, b"1", b"1000000")
        window = raw.command("a3", "UID SEARCH UID 1:1000")[0].split()[2:]
        assert [int(u) for u in window] == list(range(1, 1001))
        assert raw.command("a4", "UID SEARCH RETURN (COUNT ALL) ALL")[0] == \
            b'* ESEARCH (TAG "a4") UID COUNT 1000000 ALL 1:1000000\r\n'
        assert raw.command("a5", "UID FETCH 999999:* (UID)")[:2] == [
            b"* 999999 FETCH (UID 999999)\r\n", b"* 1000000 FETCH (UID 1000000)\r\n"]


def test_garbage_literal_announces_99999999999_bytes_then_sends_random_bytes() -> None:
    with HostileImapServer("garbage_literal") as server:
        with RawClient(server) as raw:
            raw.login()
            raw.command("a1", "SELECT INBOX")
            raw.send("a2 UID FETCH 1 (BODY.PEEK[])")
            assert raw.readline() == b"* 1 FETCH (UID 1 BODY[] {99999999999}\r\n"
            garbage = raw.read_exact(4 * MiB)
        assert len(set(garbage)) == 256  # random bytes, not a message
        _wait_for_no_connections(server)


def test_disconnect_mid_literal_sends_half_of_the_announced_literal_then_closes() -> None:
    with HostileImapServer("disconnect_mid_literal") as server, RawClient(server) as raw:
        raw.login()
        raw.command("a1", "SELECT INBOX")
        raw.send("a2 UID FETCH 2 (UID BODY.PEEK[])")
        body = server.message("INBOX", 2)
        assert raw.readline() == f"* 2 FETCH (UID 2 BODY[] {{{len(body)}}}\r\n".encode()
        assert b"".join(raw.read_chunks()) == body[:len(body) // 2]
    with HostileImapServer("disconnect_mid_literal", literal_bytes=3 * MiB) as server, \
            RawClient(server) as raw:
        raw.login()
        raw.command("a1", "SELECT INBOX")
        raw.send("a2 UID FETCH 1 (BODY.PEEK[])")
        assert raw.readline().endswith(f"BODY[] {{{3 * MiB}}}\r\n".encode())
        assert sum(len(chunk) for chunk in raw.read_chunks()) == 3 * MiB // 2


def test_bye_mid_command_answers_the_first_select_with_bye_and_a_retry_succeeds() -> None:
    with HostileImapServer("bye_mid_command") as server:
        with RawClient(server) as raw:
            raw.login()
            raw.send("a1 SELECT INBOX")
            assert raw.readline() == b"* BYE server shutting down\r\n"
            assert list(raw.read_chunks()) == []  # closed, no tagged answer
        with RawClient(server) as raw:
            raw.login()
            assert raw.command("a1", "SELECT INBOX")[-1].startswith(b"a1 OK")
    assert server.connections == 2


def test_long_line_sends_50_mb_without_a_line_end_then_closes() -> None:
    with HostileImapServer("long_line") as server, RawClient(server, timeout=10) as raw:
        raw.login()
        assert raw.command("a1", "CAPABILITY")[-1].startswith(b"a1 OK")  # not a sync command
        raw.send('a2 LIST "" "*"')
        total = 0
        newlines = 0
        first = b""
        for chunk in raw.read_chunks():
            first = first or chunk[:5]
            total += len(chunk)
            newlines += chunk.count(b"\n")
    assert (first, total, newlines) == (b"* OK ", 50_000_000, 0)


def test_stop_ends_stalled_and_dripping_connections_within_a_second() -> None:
    endless = HostileImapServer("endless_list").__enter__()
    drip = HostileImapServer("slow_drip").__enter__()  # 3 s between bytes
    clients = [RawClient(endless), RawClient(drip)]
    for client in clients:
        client.login()
        client.send('a1 LIST "" "*"')  # and never read: the endless list stalls on a full buffer
    time.sleep(0.5)
    try:
        for server in (endless, drip):
            start = time.monotonic()
            server.stop()
            assert time.monotonic() - start < 1.0
            assert server.active_connections == 0
    finally:
        for client in clients:
            client.close()
