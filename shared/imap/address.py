"""Which addresses a user-typed IMAP host may resolve to, and a connect that uses only those.

Users type in hosts, so a host name is hostile input (DESIGN.md invariant 9): it must not reach
loopback, private networks, the cloud metadata service (169.254.169.254) or anything else internal.

Two holes this module closes:

1. IPv6 forms that carry an IPv4 address inside, most of which ``ipaddress.is_global`` calls global on
   Python 3.11, although the packet ends up at the embedded IPv4 address:

   - IPv4-mapped ``::ffff:0:0/96`` and IPv4-compatible ``::/96`` (RFC 4291 section 2.5.5; the
     latter deprecated, ``::`` and ``::1`` excepted), IPv4-translated ``::ffff:0:0:0/96``
     (SIIT, RFC 6145 / RFC 2765 section 2.1);
   - NAT64 well-known prefix ``64:ff9b::/96`` (RFC 6052 section 2.1): the IPv4 address is the last
     32 bits. RFC 6052 section 3.1 says translators must not use it for non-global IPv4 addresses,
     but nothing forces a DNS answer or a user to respect that, so it is judged like any other;
   - NAT64 local-use prefix ``64:ff9b:1::/48`` (RFC 8215): the operator carves a network-specific
     prefix of any RFC 6052 section 2.2 length (/48, /56, /64 or /96) out of it, and the address
     alone does not say which. We read it as the /96 format (the last 32 bits), the common choice.
     Trying every length and refusing when any reading is internal does not work: the /64 reading
     of an ordinary ``64:ff9b:1::/96`` address is ``0.0.0.x``. A deployment whose translator uses
     a shorter prefix inside ``64:ff9b:1::/48`` is not protected by this reading;
   - 6to4 ``2002::/16`` (RFC 3056 section 2): the IPv4 address is bits 16-47;
   - Teredo ``2001::/32`` (RFC 4380 section 4): the server's IPv4 address is bits 32-63, the
     client's is the last 32 bits inverted; refused when either is.

2. DNS rebinding: checking a name and then letting the connection resolve it again lets an
   attacker's DNS answer a public address first and an internal one second. ``resolve`` calls
   ``getaddrinfo`` once and judges every address; ``connect`` connects to exactly those.

A name with one internal address among public ones is refused as a whole: which address a
connection ends up using is not ours to choose once the name is accepted.

What "internal" means follows the IANA special-purpose registries (RFC 6890) with explicit reasons,
then ``is_global`` as a backstop; IPv6 must also be in global unicast ``2000::/3``, which refuses
site-local ``fec0::/10`` (deprecated by RFC 3879), unique local ``fc00::/7`` and reserved space.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from mailferry.errors import ImapAddressRefused, ImapConnectionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Checked in order; the first match gives the reason (RFC 6890 and the IANA IPv4 registry).
_IPV4_REFUSED: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/32"), "unspecified"),
    (_V4("0.0.0.0/8"), "'this network' (RFC 6890)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),
    (_V4("10.0.0.0/8"), "private (RFC 1918)"),
    (_V4("172.16.0.0/12"), "private (RFC 1918)"),
    (_V4("192.168.0.0/16"), "private (RFC 1918)"),
    (_V4("100.64.0.0/10"), "shared address space (carrier-grade NAT, RFC 6598)"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments (RFC 6890)"),
    (_V4("192.0.2.0/24"), "documentation (RFC 5737)"),
    (_V4("198.51.100.0/24"), "documentation (RFC 5737)"),
    (_V4("203.0.113.0/24"), "documentation (RFC 5737)"),
    (_V4("198.18.0.0/15"), "benchmarking (RFC 2544)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

# Inside 192.0.0.0/24, the IANA registry marks these two anycast services globally reachable.
_IPV4_GLOBAL_EXCEPTIONS = frozenset({ipaddress.IPv4Address("192.0.0.9"),  # PCP anycast, RFC 7723
                                     ipaddress.IPv4Address("192.0.0.10")})  # TURN anycast, RFC 8155


_IPV6_REFUSED: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local (deprecated, RFC 3879)"),
    (_V6("fc00::/7"), "unique local (RFC 4193)"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("100::/64"), "discard-only (RFC 6666)"),
    (_V6("2001:db8::/32"), "documentation (RFC 3849)"),
    (_V6("3fff::/20"), "documentation (RFC 9637)"),
    (_V6("2001:2::/48"), "benchmarking (RFC 5180)"),
    (_V6("2001:10::/28"), "ORCHID (RFC 4843)"),
)

_GLOBAL_UNICAST = _V6("2000::/3")

# IPv6 prefixes whose addresses stand for an IPv4 address held in the low 32 bits.
_LOW_32_EMBEDDINGS: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::ffff:0:0/96"), "IPv4-mapped"),
    (_V6("::ffff:0:0:0/96"), "IPv4-translated"),
    (_V6("64:ff9b::/96"), "NAT64"),
    (_V6("64:ff9b:1::/48"), "NAT64 local-use, read as /96"),
    (_V6("::/96"), "IPv4-compatible"),  # except :: and ::1, see _embedded_ipv4
)
_SIX_TO_FOUR = _V6("2002::/16")
_TEREDO = _V6("2001::/32")


@dataclass(frozen=True)
class Target:
    """One checked address of a host, as ``getaddrinfo`` gave it, ready for ``connect``."""

    family: socket.AddressFamily
    address: str
    sockaddr: tuple[str, int] | tuple[str, int, int, int]


def refusal(address: IPAddress) -> str | None:
    """Why mailferry may not connect to ``address`` (one phrase naming it), or None if it may."""
    if isinstance(address, ipaddress.IPv4Address):
        why = _ipv4_why(address)
        return None if why is None else f"{address} is {why}"
    bare = ipaddress.IPv6Address(int(address))  # the scope id (fe80::1%eth0) does not change the class
    embedded = _embedded_ipv4(bare)
    for inner, kind in embedded:
        why = _ipv4_why(inner)
        if why is not None:
            return f"{inner} (embedded in {address}, {kind}) is {why}"
    if embedded:
        return None  # the packets go to the embedded IPv4 address, which is public
    for network, why in _IPV6_REFUSED:
        if bare in network:
            return f"{address} is {why}"
    if bare not in _GLOBAL_UNICAST:
        return f"{address} is outside global unicast 2000::/3 (reserved)"
    if not bare.is_global:
        return f"{address} is not globally reachable (RFC 6890)"
    return None


def _ipv4_why(address: ipaddress.IPv4Address) -> str | None:
    if address in _IPV4_GLOBAL_EXCEPTIONS:
        return None
    for network, why in _IPV4_REFUSED:
        if address in network:
            return why
    if not address.is_global:
        return "not globally reachable (RFC 6890)"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[tuple[ipaddress.IPv4Address, str]]:
    """The IPv4 addresses a packet to ``address`` may really be delivered to, with the mechanism."""
    value = int(address)
    if address in _TEREDO:
        # RFC 4380 section 4: 2001:0000:<server IPv4>:<flags>:<port ^ 0xffff>:<client IPv4 ^ ~0>.
        server = ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF)
        client = ipaddress.IPv4Address((value & 0xFFFFFFFF) ^ 0xFFFFFFFF)
        return [(server, "Teredo server"), (client, "Teredo client")]
    if address in _SIX_TO_FOUR:
        # RFC 3056 section 2: 2002:<IPv4>::/48, the IPv4 address in bits 16-47.
        return [(ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF), "6to4")]
    for network, kind in _LOW_32_EMBEDDINGS:
        if address in network and not (kind == "IPv4-compatible" and value <= 1):
            return [(ipaddress.IPv4Address(value & 0xFFFFFFFF), kind)]
    return []


def resolve(host: str, port: int, *, allow_private: bool) -> list[Target]:
    """Resolve ``host`` once and judge every address; the result is what ``connect`` may use.

    Refused as a whole when any address is refused, unless ``allow_private`` (the operator's
    MAILFERRY_ALLOW_PRIVATE_NETWORKS=1); the addresses are returned either way, so the caller
    connects to exactly what was checked and a second DNS answer never matters.
    """
    if not host.isprintable() or any(c.isspace() for c in host):
        # getaddrinfo stops at a NUL ("127.0.0.1\0.example" is 127.0.0.1) and a line break would
        # forge log lines: no host name holds either, so refuse before any lookup.
        raise ImapAddressRefused(f"{host!r}: not a valid host name (control or space character)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImapConnectionError(f"{host}: host name cannot be resolved") from exc
    except (UnicodeError, ValueError) as exc:  # the IDNA codec refuses an over-long label
        raise ImapAddressRefused(f"{host}: not a valid host name ({exc})") from exc
    targets: list[Target] = []
    for family, _kind, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6) or isinstance(sockaddr[0], int):
            continue  # (int, bytes): an IPv6 answer on a Python built without IPv6 support
        text = sockaddr[0]
        target = Target(family, text, sockaddr)
        if target in targets:
            continue
        if not allow_private:
            reason = refusal(ipaddress.ip_address(text))
            if reason is not None:
                raise ImapAddressRefused(
                    f"{host}:{port}: {reason}, not a public address; mailboxes on internal "
                    "networks need MAILFERRY_ALLOW_PRIVATE_NETWORKS=1")
        targets.append(target)
    if not targets:
        raise ImapConnectionError(f"{host}: host name cannot be resolved (no IPv4 or IPv6 address)")
    return targets


def connect(targets: Sequence[Target], timeout: float) -> socket.socket:
    """Connect to the first of ``targets`` that answers, in order, as ``socket.create_connection``
    does, but without looking the name up again (that second lookup is what DNS rebinding needs).

    ``timeout`` bounds each attempt, so the whole call takes at most ``len(targets) * timeout``.
    The errors are create_connection's: the last attempt's ConnectionRefusedError, TimeoutError or
    OSError. TCP_NODELAY is set: imaplib writes a command and its CRLF separately, and Nagle's
    algorithm would hold the CRLF back for a delayed ACK (up to 40 ms per command).
    """
    error: OSError | None = None
    for target in targets:
        sock = socket.socket(target.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(target.sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    if error is not None:
        raise error
    raise OSError("no address to connect to")
