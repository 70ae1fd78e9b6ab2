"""What a person or a host application types in, checked before it is stored.

Hosts, user names and email addresses end up in protocol lines (DNS, TLS SNI, IMAP LOGIN, the
To: header of a notification email), so they are checked strictly here, once, for every caller:
the CLI and a host application get the same one-line :class:`InvalidInput` for the same value.
"""

from __future__ import annotations

import ipaddress
import re

from mailferry.errors import InvalidInput

SECURITY_MODES = ("ssl", "starttls", "none")
#: The largest id PostgreSQL's bigint holds: anything above cannot name a row.
MAX_ID = 2**63 - 1
#: A first sync window longer than a century is a typo, not a wish.
MAX_FIRST_SYNC_DAYS = 36500
MAX_TEXT = 1000

# RFC 5322 3.2.3 atext and 3.4.1 addr-spec: dot-atom or quoted-string "@" dot-atom or
# domain-literal. No comments, no folding white space, no display name, no second address:
# one mailbox, as the notifier's To: header needs.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x21\x23-\x5B\x5D-\x7E ]|\\[\x21-\x7E ])*"'
_DOMAIN_LITERAL = r"\[[\x21-\x5A\x5E-\x7E]*\]"
_ADDR_SPEC = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})@(?:{_DOT_ATOM}|{_DOMAIN_LITERAL})")
# RFC 1123 2.1 host names (underscores tolerated: some internal names carry them).
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def text(value: str, what: str) -> str:
    """PostgreSQL text cannot hold NUL; anything else is data (stored and shown escaped)."""
    if "\x00" in value:
        raise InvalidInput(f"{what}: must not contain a NUL character")
    return value


def has_control(value: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def printable(value: str, what: str) -> str:
    """A control character (CR/LF most of all) in a protocol line could end it and start
    another command."""
    if has_control(value):
        raise InvalidInput(f"{what}: must not contain control characters (CR, LF, NUL...)")
    return value


def email_address(value: str, what: str = "email") -> str:
    """Exactly one RFC 5322 addr-spec (``ann@example.com``), ASCII, at most 254 characters
    (RFC 5321 4.5.3.1 path limit): never a list, never a display name."""
    printable(value, what)
    if not 3 <= len(value) <= 254 or not _ADDR_SPEC.fullmatch(value):
        raise InvalidInput(f"{what}: must be one email address like ann@example.com")
    local, _, domain = value.rpartition("@")
    if len(local) > 64:
        raise InvalidInput(f"{what}: the part before @ is longer than 64 characters")
    if not domain.startswith("[") and not all(_LABEL.fullmatch(p) for p in domain.split(".")):
        raise InvalidInput(f"{what}: {domain!r} is not a valid domain")
    return value


def host(value: str, what: str = "host") -> str:
    """A host name (RFC 1123: 1-253 characters, dot-separated labels of at most 63 letters,
    digits, hyphens) or an IPv4 or IPv6 address. International names in their ASCII (xn--)
    form."""
    printable(value, what)
    if not value or len(value) > 253:
        raise InvalidInput(f"{what}: must be 1 to 253 characters long")
    candidate = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(candidate)
        return candidate
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            if len(label) > 63:
                raise InvalidInput(f"{what}: a part between dots is longer than 63 characters")
            raise InvalidInput(f"{what}: must be a host name (letters, digits, hyphens, dots; "
                               "international names in their xn-- form) or an IP address")
    return value


def port(value: int, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidInput(f"{what}: must be a number from 1 to 65535")
    return value


def security(value: str, what: str = "security") -> str:
    if value not in SECURITY_MODES:
        raise InvalidInput(f"{what}: must be one of {', '.join(SECURITY_MODES)}")
    return value


def username(value: str, what: str = "username") -> str:
    printable(value, what)
    if not value.strip():
        raise InvalidInput(f"{what}: must not be empty")
    if len(value) > MAX_TEXT:
        raise InvalidInput(f"{what}: longer than {MAX_TEXT} characters")
    return value


def password(value: str, what: str = "password") -> str:
    """No line break or NUL: IMAP sends it on a command line (RFC 3501 9: a quoted string
    cannot hold them), so such a password could never log in."""
    if not value:
        raise InvalidInput(f"{what}: must not be empty")
    if any(c in value for c in "\r\n\x00"):
        raise InvalidInput(f"{what}: must not contain a line break or NUL character")
    return value


def refresh_token(value: str, what: str = "refresh token") -> str:
    """An OAuth2 refresh token: it goes into a form body, never a protocol line, but a control
    character or a book is a paste gone wrong."""
    if not value:
        raise InvalidInput(f"{what}: must not be empty")
    if has_control(value) or len(value) > 8192:
        raise InvalidInput(f"{what}: holds control characters or is too long")
    return value


def display_name(value: str, what: str = "name") -> str:
    """Any text (it is shown escaped), but not empty and not a book."""
    if not value.strip() or len(value) > MAX_TEXT or "\x00" in value:
        raise InvalidInput(f"{what}: must be 1 to {MAX_TEXT} characters, without NUL")
    return value


def first_sync_days(value: int, what: str = "first sync days") -> int:
    if isinstance(value, bool) or not 1 <= value <= MAX_FIRST_SYNC_DAYS:
        raise InvalidInput(f"{what}: must be a number from 1 to {MAX_FIRST_SYNC_DAYS}")
    return value


def folder_names(values: list[str], what: str = "folders") -> list[str]:
    for v in values:
        if "\x00" in v or len(v) > MAX_TEXT:
            raise InvalidInput(f"{what}: a folder name must be under {MAX_TEXT} characters, "
                               "without NUL")
    return values


def record_id(value: int) -> bool:
    """True when ``value`` can be a row id at all (a bigint above 0)."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= MAX_ID
