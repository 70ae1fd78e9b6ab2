"""The IMAP adapter: connect with ssl / starttls / none, classify failures, list and read folders.

Every failure leaves here as one ``shared.errors.ImapError`` subclass with a one-line message that
names the server, so a sync run and ``mailferry mailbox check`` can say what went wrong, and the
fetcher can tell a refused login (credentials invalid) from a transient fault.
"""

from __future__ import annotations

import contextlib
import imaplib
import ipaddress
import socket
import ssl
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imapclient import IMAPClient, imap_utf7
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from imapclient.imapclient import SocketTimeout, seq_to_parenstr_upper
from imapclient.response_parser import parse_fetch_response
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.errors import (
    ConfigError,
    ImapAddressRefused,
    ImapAuthError,
    ImapConnectionError,
    ImapError,
    ImapProtocolError,
    ImapTlsError,
)
from shared.messages import FolderInfo, FolderType

Security = Literal["ssl", "starttls", "none"]

# Response codes that mean "the server cannot serve you now", not "your password is wrong"
# (RFC 5530 section 3).
_TRANSIENT_CODES = (b"[UNAVAILABLE]", b"[INUSE]", b"[SERVERBUG]", b"[LIMIT]")


class ImapConfig(BaseModel):
    """Connection settings of one IMAP account; the password never appears in repr or logs.

    Built with keywords, or positionally as in ImapBundle:
    ``ImapConfig("imap.example.com", 993, "ssl", "user", "pwd")`` (then ``timeout``,
    ``ca_file``, ``allow_private_networks`` in that order). ``timeout`` bounds every read, in
    seconds; connecting waits at most 30 s of it.
    """

    model_config = ConfigDict(frozen=True)
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    security: Security
    username: str = Field(min_length=1)
    password: SecretStr
    timeout: float = Field(default=60.0, gt=0)
    ca_file: Path | None = None
    allow_private_networks: bool = False

    def __init__(self, host: str, port: int, security: Security, username: str,
                 password: str | SecretStr, timeout: float = 60.0, ca_file: Path | str | None = None,
                 allow_private_networks: bool = False) -> None:
        super().__init__(host=host, port=port, security=security, username=username,
                         password=password, timeout=timeout, ca_file=ca_file,
                         allow_private_networks=allow_private_networks)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificates and host names verified; a CA file replaces the system store when given."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def check_address(host: str, port: int) -> None:
    """Refuse a host any of whose addresses is loopback, private, link-local or otherwise not
    public (after DNS resolution), so user-supplied settings cannot reach internal services.

    The connection itself resolves the name again; a DNS answer that changes in between (DNS
    rebinding) is not caught here.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ImapConnectionError(f"{host}: host name cannot be resolved") from exc
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise ImapAddressRefused(
                f"{host}:{port}: {address} is not a public address; mailboxes on internal "
                "networks need MAILFERRY_ALLOW_PRIVATE_NETWORKS=1")


def open_connection(config: ImapConfig) -> IMAPClient:
    timeout = SocketTimeout(connect=min(config.timeout, 30.0), read=config.timeout)
    where = config.address
    if not config.allow_private_networks:
        check_address(config.host, config.port)
    try:
        if config.security == "ssl":
            client = IMAPClient(config.host, config.port, ssl=True,
                                ssl_context=tls_context(config.ca_file), timeout=timeout)
        else:
            client = IMAPClient(config.host, config.port, ssl=False, timeout=timeout)
    except ssl.SSLCertVerificationError as exc:
        raise ImapTlsError(f"{where}: certificate not trusted: {exc.verify_message}") from exc
    except ssl.SSLError as exc:
        raise ImapTlsError(
            f"{where}: TLS handshake failed ({exc.reason or exc}); is this the implicit-TLS port?"
        ) from exc
    except socket.gaierror as exc:
        raise ImapConnectionError(f"{config.host}: host name cannot be resolved") from exc
    except ConnectionRefusedError as exc:
        raise ImapConnectionError(f"{where}: connection refused") from exc
    except TimeoutError as exc:
        raise ImapConnectionError(f"{where}: no answer within {timeout.connect:g}s") from exc
    except (imaplib.IMAP4.error, IMAPClientError) as exc:
        raise ImapConnectionError(
            f"{where}: not an IMAP greeting ({_text(exc)}); wrong port or security?"
        ) from exc
    except OSError as exc:
        raise ImapConnectionError(f"{where}: {exc.strerror or exc}") from exc
    # imaplib writes a command and its CRLF separately; without TCP_NODELAY a peer that delays
    # its ACKs holds each such command back for up to 40 ms (Nagle's algorithm).
    with contextlib.suppress(OSError, AttributeError):
        client._imap.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.normalise_times = False  # keep INTERNALDATE's zone
    client.folder_encode = False  # we keep raw (modified UTF-7) names and decode them ourselves
    if config.security == "starttls":
        _starttls(client, config)
    return client


def _starttls(client: IMAPClient, config: ImapConfig) -> None:
    where = config.address
    try:
        offered = client.has_capability("STARTTLS")
    except (IMAPClientError, OSError) as exc:
        _close(client)
        raise ImapConnectionError(f"{where}: CAPABILITY failed: {_text(exc)}") from exc
    if not offered:
        _close(client)
        # Never downgrade: the password would cross the network in clear text.
        raise ImapTlsError(f"{where}: STARTTLS is configured but the server does not offer it")
    try:
        client.starttls(tls_context(config.ca_file))
    except ssl.SSLCertVerificationError as exc:
        _close(client)
        raise ImapTlsError(f"{where}: certificate not trusted: {exc.verify_message}") from exc
    except (ssl.SSLError, IMAPClientError, OSError) as exc:
        _close(client)
        raise ImapTlsError(f"{where}: STARTTLS failed: {_text(exc)}") from exc


def login(client: IMAPClient, config: ImapConfig) -> None:
    # imaplib sends the user name of LOGIN as it is, unquoted: a space would split it and a
    # CRLF would end the command and start another one (a second LOGIN, as anyone). It is sent
    # as a quoted string here (RFC 3501 section 4.3), which cannot hold CR, LF or NUL, and
    # LOGIN strings are 7-bit (imaplib would raise UnicodeEncodeError on anything else).
    _check_login_string(config.username, "user name", config, show=True)
    _check_login_string(config.password.get_secret_value(), "password", config, show=False)
    try:
        client.login(_quote(config.username), config.password.get_secret_value())
    except LoginError as exc:
        raw = _text(exc).encode()
        if any(code in raw.upper() for code in _TRANSIENT_CODES):
            raise ImapConnectionError(
                f"{config.address}: server unavailable for login: {_text(exc)}"
            ) from exc
        raise ImapAuthError(
            f"{config.address}: login refused for user {config.username!r}: {_text(exc)}"
        ) from exc
    except (IMAPClientAbortError, OSError) as exc:
        raise ImapConnectionError(f"{config.address}: connection lost during login") from exc
    except IMAPClientError as exc:
        raise ImapProtocolError(f"{config.address}: login failed: {_text(exc)}") from exc


def _check_login_string(value: str, what: str, config: ImapConfig, *, show: bool) -> None:
    shown = f" {value!r}" if show else ""
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"{config.address}: the {what}{shown} contains a line break or NUL "
                          "character, which IMAP LOGIN cannot carry")
    if not value.isascii():
        raise ConfigError(f"{config.address}: the {what}{shown} is not ASCII, which IMAP LOGIN "
                          "cannot carry")


def _quote(value: str) -> str:
    """An IMAP quoted string (RFC 3501 section 9, quoted-specials escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # already dropped: closing the socket is all that is left
        with contextlib.suppress(Exception):
            client.shutdown()


@contextmanager
def imap_errors(where: str) -> Iterator[None]:
    """Turn imapclient/socket exceptions raised inside into our hierarchy."""
    try:
        yield
    except ImapError:
        raise
    except (IMAPClientAbortError, OSError, EOFError) as exc:
        raise ImapConnectionError(f"{where}: connection lost: {_text(exc)}") from exc
    except (IMAPClientError, imaplib.IMAP4.error) as exc:
        raise ImapProtocolError(f"{where}: {_text(exc)}") from exc


# --- folders -----------------------------------------------------------------------------------

_SPECIAL_USE: dict[bytes, FolderType] = {
    b"\\sent": "sent",
    b"\\drafts": "drafts",
    b"\\trash": "trash",
    b"\\junk": "spam",
    b"\\archive": "archive",
}
# Names clients use when the server has no SPECIAL-USE (RFC 6154); compared case-insensitively
# with the last component of the folder's path.
_WELL_KNOWN: dict[str, FolderType] = {
    "sent": "sent", "sent items": "sent", "sent messages": "sent", "sent mail": "sent",
    "drafts": "drafts", "draft": "drafts",
    "trash": "trash", "deleted items": "trash", "deleted messages": "trash", "bin": "trash",
    "junk": "spam", "spam": "spam", "junk e-mail": "spam", "junk email": "spam", "bulk mail": "spam",
    "archive": "archive", "archives": "archive",
}


def folder_type(name: str, delimiter: str | None, flags: Iterable[bytes]) -> FolderType:
    if name.upper() == "INBOX":
        return "inbox"
    lowered = {f.lower() for f in flags}
    for flag, kind in _SPECIAL_USE.items():
        if flag in lowered:
            return kind
    leaf = name.rsplit(delimiter, 1)[-1] if delimiter else name
    return _WELL_KNOWN.get(leaf.strip().lower(), "other")


def decode_folder_name(raw: bytes) -> tuple[str, str]:
    """(name as the user sees it, raw name as sent on the wire) for a LIST name.

    Names are modified UTF-7 (RFC 3501 section 5.1.3); a server that sends raw 8-bit names anyway
    gets them decoded as UTF-8 for display.
    """
    try:
        raw_text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        return text, raw.decode("utf-8", "surrogateescape")
    try:
        return imap_utf7.decode(raw), raw_text
    except Exception:  # not valid modified UTF-7: show it as sent
        return raw_text, raw_text


def list_folders(client: IMAPClient, where: str) -> list[FolderInfo]:
    with imap_errors(where):
        listed = client.list_folders()
    folders: list[FolderInfo] = []
    for flags, delimiter, raw in listed:
        raw_bytes = raw if isinstance(raw, bytes) else str(raw).encode()
        name, raw_name = decode_folder_name(raw_bytes)
        delim = delimiter.decode("ascii", "replace") if isinstance(delimiter, bytes) else delimiter
        lowered = {f.lower() for f in flags}
        selectable = not ({b"\\noselect", b"\\nonexistent"} & lowered) and _sendable(raw_name)
        folders.append(
            FolderInfo(
                name=name,
                raw_name=raw_name,
                delimiter=delim,
                flags=tuple(f.decode("ascii", "replace") for f in flags),
                type=folder_type(name, delim, flags),
                selectable=selectable,
            )
        )
    return folders


def _sendable(raw_name: str) -> bool:
    """Only names we can send back as a quoted string (RFC 3501 section 9, quoted-specials)."""
    return raw_name.isascii() and not any(c in raw_name for c in "\r\n\0")


# --- reading a folder --------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderStatus:
    uidvalidity: int
    uidnext: int | None
    highest_modseq: int | None
    exists: int


def folder_uidvalidity(client: IMAPClient, raw_name: str, where: str) -> int | None:
    with imap_errors(f"{where} {raw_name}"):
        status = client.folder_status(raw_name, ["UIDVALIDITY"])
    return _int(status.get(b"UIDVALIDITY"))


def existing_uids(client: IMAPClient, up_to: int, where: str) -> set[int]:
    """The UIDs at or below ``up_to`` still in the selected folder: what an expunge diff needs
    when the server has no QRESYNC (RFC 7162 section 3.2)."""
    if up_to < 1:
        return set()
    with imap_errors(where):
        found = client.search(["UID", f"1:{up_to}"])
    return {uid for uid in found if uid <= up_to}


def uid_set(uids: Sequence[int]) -> str:
    """Compress sorted UIDs into an IMAP sequence set: [1,2,3,7] -> '1:3,7'."""
    parts: list[str] = []
    start = prev = None
    for uid in uids:
        if start is None:
            start = prev = uid
        elif uid == prev + 1:  # type: ignore[operator]
            prev = uid
        else:
            parts.append(f"{start}:{prev}" if start != prev else f"{start}")
            start = prev = uid
    if start is not None:
        parts.append(f"{start}:{prev}" if start != prev else f"{start}")
    return ",".join(parts)


@dataclass(frozen=True)
class Extensions:
    condstore: bool  # SELECT reports HIGHESTMODSEQ, FETCH takes CHANGEDSINCE (RFC 7162 3.1)
    qresync: bool  # FETCH takes VANISHED: expunged UIDs without a UID diff (RFC 7162 3.2)


def enable_extensions(client: IMAPClient, where: str) -> Extensions:
    """Turn on CONDSTORE and QRESYNC when the server announces them. Decided from CAPABILITY
    alone: some servers accept the commands without announcing them."""
    with imap_errors(where):
        wanted = [ext for ext in ("CONDSTORE", "QRESYNC") if client.has_capability(ext)]
        if wanted:
            client.enable(*wanted)
    return Extensions(condstore=bool(wanted), qresync="QRESYNC" in wanted)


def vanished(client: IMAPClient) -> set[int]:
    """UIDs the server reported as VANISHED since the last call (RFC 7162 section 3.2.10)."""
    found: set[int] = set()
    for data in client._imap.untagged_responses.pop("VANISHED", []):
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)
        for part in text.replace("(EARLIER)", "").strip().split(","):
            low, _, high = part.strip().partition(":")
            if low.isdigit():
                start, end = int(low), int(high) if high.isdigit() else int(low)
                found.update(range(min(start, end), max(start, end) + 1))
    return found


def fetch(client: IMAPClient, uids: Sequence[int] | str, items: Sequence[str],
          where: str, modifiers: Sequence[str] = ()) -> dict[int, dict[bytes, Any]]:
    """UID FETCH with a compressed UID set.

    ``IMAPClient.fetch`` sends every UID separately (a 100,000-UID command line is refused by
    servers) and cannot filter a range's unsolicited responses; this goes one level down and
    keeps only the UIDs asked for (RFC 3501 section 7.4.2 allows unsolicited FETCH responses).
    """
    if not uids:
        return {}
    if isinstance(uids, str):  # a range such as "1:500"
        low, _, high = uids.partition(":")
        wanted: range | set[int] = range(int(low), int(high or low) + 1)
        message_set = uids
    else:
        wanted = set(uids)
        message_set = uid_set(sorted(wanted))
    args = ["UID", "FETCH", message_set, seq_to_parenstr_upper(list(items))]
    if modifiers:
        args.append(seq_to_parenstr_upper(list(modifiers)))
    with imap_errors(where):
        tag = client._imap._command(*args)
        typ, data = client._imap._command_complete("FETCH", tag)
        client._checkok("fetch", typ, data)
        typ, data = client._imap._untagged_response(typ, data, "FETCH")
        response = parse_fetch_response(data, client.normalise_times, True)
    return {uid: values for uid, values in response.items() if uid in wanted}


def modseq(value: Any) -> int | None:
    """FETCH MODSEQ comes as a parenthesized list: ``MODSEQ (12)``."""
    return _int(value)


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
        if value is None:
            return None
    return int(value)


def _text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if text.startswith("b'") or text.startswith('b"'):
        text = text[2:-1]
    return text or type(exc).__name__
