"""Which addresses a user-typed IMAP host may reach (``shared.imap.address``).

``socket.getaddrinfo`` is replaced by a fake DNS for every test here, so no name is ever looked up
for real; the only connections are to listening sockets on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest

from mailferry.errors import ImapAddressRefused, ImapConnectionError
from mailferry.imap.address import Target, connect, refusal, resolve

HINT = "MAILFERRY_ALLOW_PRIVATE_NETWORKS=1"


class FakeDns:
    """Answers from a table; a name may answer differently on each lookup (DNS rebinding)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.calls: list[tuple[str, object, int]] = []

    def add(self, name: str, *rounds: list[str]) -> None:
        self.answers[name] = list(rounds)

    def getaddrinfo(self, host: str, port: object, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> list[tuple[object, ...]]:
        self.calls.append((host, port, type))
        host.encode("idna")  # as the real one does first: an invalid name raises UnicodeError
        rounds = self.answers.get(host)
        if not rounds:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = rounds.pop(0) if len(rounds) > 1 else rounds[0]
        infos: list[tuple[object, ...]] = []
        for text in addresses:
            assert isinstance(port, int)
            if ":" in text:
                bare, _, scope = text.partition("%")
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                              (text, port, 0, 2 if scope else 0)))
                assert ipaddress.ip_address(bare)
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, port)))
        return infos


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


# (address, the reason; "{}" stands for the address as ipaddress prints it, which varies by Python)
REFUSED = [
    ("0.0.0.0", "0.0.0.0 is unspecified"),
    ("0.1.2.3", "0.1.2.3 is 'this network' (RFC 6890)"),
    ("127.0.0.1", "127.0.0.1 is loopback"),
    ("127.8.9.10", "127.8.9.10 is loopback"),
    ("169.254.169.254", "169.254.169.254 is link-local"),
    ("10.1.2.3", "10.1.2.3 is private (RFC 1918)"),
    ("172.16.0.9", "172.16.0.9 is private (RFC 1918)"),
    ("192.168.1.1", "192.168.1.1 is private (RFC 1918)"),
    ("100.64.0.1", "100.64.0.1 is shared address space (carrier-grade NAT, RFC 6598)"),
    ("192.0.0.1", "192.0.0.1 is IETF protocol assignments (RFC 6890)"),
    ("192.0.2.1", "192.0.2.1 is documentation (RFC 5737)"),
    ("198.18.0.1", "198.18.0.1 is benchmarking (RFC 2544)"),
    ("224.0.0.1", "224.0.0.1 is multicast"),
    ("233.252.0.1", "233.252.0.1 is multicast"),  # is_global says yes on 3.11
    ("255.255.255.255", "255.255.255.255 is broadcast"),
    ("240.0.0.1", "240.0.0.1 is reserved"),
    ("::", ":: is unspecified"),
    ("::1", "::1 is loopback"),
    ("fe80::1", "fe80::1 is link-local"),
    ("fe80::1%eth0", "fe80::1%eth0 is link-local"),
    ("fec0::1", "fec0::1 is site-local (deprecated, RFC 3879)"),
    ("fd00::1", "fd00::1 is unique local (RFC 4193)"),
    ("fc00::1", "fc00::1 is unique local (RFC 4193)"),
    ("ff02::1", "ff02::1 is multicast"),
    ("100::1", "100::1 is discard-only (RFC 6666)"),
    ("2001:db8::1", "2001:db8::1 is documentation (RFC 3849)"),
    ("3fff::1", "3fff::1 is documentation (RFC 9637)"),
    ("5f00::1", "5f00::1 is outside global unicast 2000::/3 (reserved)"),
    ("::ffff:127.0.0.1", "127.0.0.1 (embedded in {}, IPv4-mapped) is loopback"),
    ("::ffff:169.254.169.254", "169.254.169.254 (embedded in {}, IPv4-mapped) is link-local"),
    ("::ffff:0:169.254.169.254", "169.254.169.254 (embedded in {}, IPv4-translated) is link-local"),
    ("::10.0.0.1", "10.0.0.1 (embedded in {}, IPv4-compatible) is private (RFC 1918)"),
    ("::2", "0.0.0.2 (embedded in {}, IPv4-compatible) is 'this network' (RFC 6890)"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254 (embedded in 64:ff9b::a9fe:a9fe, NAT64) is link-local"),
    ("64:ff9b::7f00:1", "127.0.0.1 (embedded in 64:ff9b::7f00:1, NAT64) is loopback"),
    ("64:ff9b:1::a9fe:a9fe",
     "169.254.169.254 (embedded in 64:ff9b:1::a9fe:a9fe, NAT64 local-use, read as /96) is link-local"),
    ("64:ff9b:1:abcd:ef00::a00:1",
     "10.0.0.1 (embedded in {}, NAT64 local-use, read as /96) is private (RFC 1918)"),
    ("2002:a9fe:a9fe::1", "169.254.169.254 (embedded in 2002:a9fe:a9fe::1, 6to4) is link-local"),
    ("2002:a00:1::", "10.0.0.1 (embedded in 2002:a00:1::, 6to4) is private (RFC 1918)"),
    # Teredo: server 169.254.169.254, client 93.184.216.34 (stored inverted: a247:2ddd).
    ("2001:0:a9fe:a9fe::a247:2ddd",
     "169.254.169.254 (embedded in 2001:0:a9fe:a9fe::a247:2ddd, Teredo server) is link-local"),
    # Teredo: server 93.184.216.34, client 10.0.0.1 (stored inverted: f5ff:fffe).
    ("2001:0:5db8:d822::f5ff:fffe",
     "10.0.0.1 (embedded in 2001:0:5db8:d822::f5ff:fffe, Teredo client) is private (RFC 1918)"),
]

PUBLIC = [
    "93.184.216.34",
    "8.8.8.8",
    "192.0.0.9",  # PCP anycast: globally reachable inside 192.0.0.0/24
    "2606:2800:220:1::",
    "2606:4700:4700::1111",
    "64:ff9b::5db8:d822",  # NAT64 for 93.184.216.34
    "64:ff9b:1::5db8:d822",
    "::ffff:93.184.216.34",
    "2002:5db8:d822::1",  # 6to4 behind 93.184.216.34
    "2001:0:5db8:d822::a247:2ddd",  # Teredo, server and client 93.184.216.34
]


@pytest.mark.parametrize(("address", "reason"), REFUSED, ids=[a for a, _ in REFUSED])
def test_an_internal_address_is_refused_with_its_reason(address: str, reason: str) -> None:
    ip = ipaddress.ip_address(address)
    assert refusal(ip) == reason.format(ip)


@pytest.mark.parametrize("address", PUBLIC)
def test_a_public_address_is_accepted(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(("address", "reason"), REFUSED, ids=[a for a, _ in REFUSED])
def test_a_host_resolving_to_an_internal_address_is_refused(dns: FakeDns, address: str,
                                                            reason: str) -> None:
    dns.add("imap.example.net", [address])
    with pytest.raises(ImapAddressRefused) as refused:
        resolve("imap.example.net", 993, allow_private=False)
    assert reason.format(ipaddress.ip_address(address)) in str(refused.value)


@pytest.mark.parametrize("address", PUBLIC)
def test_a_host_resolving_to_a_public_address_is_accepted(dns: FakeDns, address: str) -> None:
    dns.add("imap.example.net", [address])
    [target] = resolve("imap.example.net", 993, allow_private=False)
    assert target.address == address
    assert target.sockaddr[:2] == (address, 993)


def test_the_refusal_is_one_line_naming_host_port_address_reason_and_the_setting(dns: FakeDns) -> None:
    dns.add("imap.example.net", ["64:ff9b::a9fe:a9fe"])
    with pytest.raises(ImapAddressRefused) as refused:
        resolve("imap.example.net", 993, allow_private=False)
    assert str(refused.value) == (
        "imap.example.net:993: 169.254.169.254 (embedded in 64:ff9b::a9fe:a9fe, NAT64) is link-local, "
        f"not a public address; mailboxes on internal networks need {HINT}")


@pytest.mark.parametrize("addresses", [["93.184.216.34", "10.0.0.5"], ["10.0.0.5", "93.184.216.34"],
                                       ["2606:2800:220:1::", "93.184.216.34", "fd00::1"]])
def test_a_name_with_one_internal_address_among_public_ones_is_refused(dns: FakeDns,
                                                                       addresses: list[str]) -> None:
    dns.add("mixed.example.net", addresses)
    with pytest.raises(ImapAddressRefused, match=r"mixed\.example\.net:993: .* not a public address"):
        resolve("mixed.example.net", 993, allow_private=False)


def test_every_public_address_is_returned_in_the_resolvers_order(dns: FakeDns) -> None:
    dns.add("imap.example.net", ["2606:2800:220:1::", "93.184.216.34", "93.184.216.34"])
    targets = resolve("imap.example.net", 143, allow_private=False)
    assert targets == [
        Target(socket.AF_INET6, "2606:2800:220:1::", ("2606:2800:220:1::", 143, 0, 0)),
        Target(socket.AF_INET, "93.184.216.34", ("93.184.216.34", 143)),
    ]


def test_private_networks_allowed_returns_the_internal_addresses_to_connect_to(dns: FakeDns) -> None:
    dns.add("dovecot.internal", ["10.0.0.5", "fe80::1%eth0"])
    targets = resolve("dovecot.internal", 993, allow_private=True)
    assert [t.address for t in targets] == ["10.0.0.5", "fe80::1%eth0"]
    assert targets[1].sockaddr == ("fe80::1%eth0", 993, 0, 2)  # the scope id travels to connect


def test_the_name_is_looked_up_once_for_stream_sockets(dns: FakeDns) -> None:
    dns.add("imap.example.net", ["93.184.216.34"])
    resolve("imap.example.net", 993, allow_private=False)
    assert dns.calls == [("imap.example.net", 993, socket.SOCK_STREAM)]


def test_an_unresolvable_name_is_a_connection_error() -> None:
    with pytest.raises(ImapConnectionError, match=r"^nowhere\.example\.net: host name cannot be resolved$"):
        resolve("nowhere.example.net", 993, allow_private=False)


def test_a_name_no_dns_label_can_hold_is_refused_before_any_lookup() -> None:
    with pytest.raises(ImapAddressRefused, match="not a valid host name"):
        resolve("a" * 64 + ".example.net", 993, allow_private=False)


@pytest.mark.parametrize("host", ["127.0.0.1\x00.example.net", "evil.example.net\nlevel=info msg=forged",
                                  "imap.example.net "])
def test_a_name_with_a_control_or_space_character_is_refused_before_any_lookup(
        dns: FakeDns, host: str) -> None:
    with pytest.raises(ImapAddressRefused, match="not a valid host name") as refused:
        resolve(host, 993, allow_private=True)
    assert "\n" not in str(refused.value)
    assert dns.calls == []


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server


def test_connect_reaches_the_checked_address_even_if_dns_now_answers_otherwise(
        dns: FakeDns, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    dns.add("rebind.example.net", ["127.0.0.1"], ["169.254.169.254"])  # second answer: metadata
    targets = resolve("rebind.example.net", port, allow_private=True)
    with connect(targets, timeout=5.0) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert len(dns.calls) == 1


def test_connect_tries_the_targets_in_order_until_one_answers(listener: socket.socket) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    port = listener.getsockname()[1]
    targets = [Target(socket.AF_INET, "127.0.0.1", dead),
               Target(socket.AF_INET, "127.0.0.1", ("127.0.0.1", port))]
    with connect(targets, timeout=5.0) as sock:
        assert sock.getpeername() == ("127.0.0.1", port)


def test_connect_raises_the_last_refusal_when_no_target_answers() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    with pytest.raises(ConnectionRefusedError):
        connect([Target(socket.AF_INET, "127.0.0.1", dead)], timeout=5.0)


def test_connect_with_no_target_is_an_os_error() -> None:
    with pytest.raises(OSError, match="no address to connect to"):
        connect([], timeout=1.0)


def test_connect_gives_up_after_the_timeout_when_nothing_answers() -> None:
    """A listener whose accept queue is full drops SYNs (Linux), so the connect waits."""
    fillers: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        address = server.getsockname()
        try:
            for _ in range(16):
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.2)
                try:
                    filler.connect(address)
                except TimeoutError:
                    break
            else:
                pytest.skip("the kernel accepted every connection; no way to make one hang locally")
            with pytest.raises(TimeoutError):
                connect([Target(socket.AF_INET, "127.0.0.1", address)], timeout=0.2)
        finally:
            for filler in fillers:
                filler.close()
