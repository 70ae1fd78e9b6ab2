"""IMAP SEARCH queries built from Python values, encoded so no value can change the command.

The shape is OroCRM ImapBundle's ``SearchQueryBuilder``, in Python style. A builder is immutable:
every method returns a new builder with one more search key, and keys given one after the other
must all match (IMAP's implicit AND). ``or_`` and ``not_`` take other builders (or queries), so a
builder can be used as a factory for the parts::

    b = SearchQueryBuilder()
    query = b.from_("alice@example.org").or_(b.subject("invoice"), b.flagged()).not_(b.seen()).get()
    # UID SEARCH FROM "alice@example.org" OR SUBJECT "invoice" FLAGGED NOT SEEN

``get()`` returns a ``SearchQuery``, a frozen value that says how it goes on the wire
(``SearchQuery.encode()``); ``shared.imap.ImapEmailManager`` sends it.

Encoding (RFC 3501 section 9, RFC 9051 section 9, the ``search-key`` and ``astring`` rules):

* A string value is a quoted string when it is ASCII without CR or LF, with ``\\`` and ``"``
  escaped (``quoted-specials``). Otherwise it is a literal (``{n}`` then the bytes), which the
  server reads by length, so nothing inside it is ever parsed as part of the command. Values with
  non-ASCII characters are UTF-8 and the query then says ``CHARSET UTF-8`` (section 6.4.4).
* NUL cannot be sent at all (``CHAR8`` excludes it, section 9): a ``ValueError`` says so.
* Header names, keywords, dates, numbers and UID sets are checked against their grammar and
  sent as atoms; anything else is a ``ValueError`` before a byte is sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TypeAlias

from mailferry.imap.wire import ImapLiteral, uid_set

__all__ = ["ImapLiteral", "SearchQuery", "SearchQueryBuilder", "WireQuery"]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# seq-number / seq-range, comma separated (RFC 3501 section 9, sequence-set); nz-number or "*".
_NUMBER = r"(?:[1-9][0-9]{0,9}|\*)"
_SEQUENCE_SET = re.compile(rf"{_NUMBER}(?::{_NUMBER})?(?:,{_NUMBER}(?::{_NUMBER})?)*\Z")
_MAX_NUMBER = 2**32 - 1  # number and nz-number are 32-bit unsigned (RFC 3501 section 9)
# A header field name (RFC 5322 section 3.6.8, printable ASCII but ":") that is also an IMAP atom
# (RFC 3501 section 9: no atom-specials "(" ")" "{" SP CTL "%" "*" '"' "\" "]").
_FIELD_NAME = re.compile(r"[!#$&'+,\-./0-9;<=>?@A-Z\[^_`a-z|}~]+\Z")
# A flag keyword is an atom too; "\" would make it a system flag, which has its own search keys.
_KEYWORD = _FIELD_NAME


WireQuery = tuple[str | None, tuple[bytes | ImapLiteral, ...]]
"""(charset or None, pieces): the text pieces are sent as they are, an ``ImapLiteral`` as
``{n}\\r\\n`` then its bytes. Spaces and parentheses are already in the text pieces."""


# --- the syntax tree ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Atom:
    text: str  # checked against its grammar when built

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class _String:
    value: str  # any text without NUL; quoted or literal on the wire

    def __str__(self) -> str:
        return _quoted(self.value) if _quotable(self.value) else f"{{literal {self.value!r}}}"


_Arg = _Atom | _String


@dataclass(frozen=True)
class _Key:
    name: str
    args: tuple[_Arg, ...] = ()


@dataclass(frozen=True)
class _Not:
    query: SearchQuery


@dataclass(frozen=True)
class _Or:
    left: SearchQuery
    right: SearchQuery


_Node = _Key | _Not | _Or


@dataclass(frozen=True)
class SearchQuery:
    """An immutable IMAP search: every key must match (an empty query matches everything).

    ``str(query)`` shows it as IMAP text (literals shown as ``{literal '...'}``); ``encode()``
    gives what goes on the wire.
    """

    keys: tuple[_Node, ...] = ()

    def __str__(self) -> str:
        return " ".join(_node_text(k) for k in self.keys) or "ALL"

    @property
    def needs_utf8(self) -> bool:
        """True when a value is not ASCII: the search must say ``CHARSET UTF-8``."""
        return any(not s.value.isascii() for s in _strings(self))

    def encode(self) -> WireQuery:
        """(charset, pieces) of ``SEARCH [CHARSET c] <keys>`` after the command name."""
        pieces: list[bytes | ImapLiteral] = []
        _encode_keys(self.keys or (_Key("ALL"),), pieces)
        return ("UTF-8" if self.needs_utf8 else None), tuple(_merge(pieces))


def _strings(query: SearchQuery) -> Iterable[_String]:
    for node in query.keys:
        if isinstance(node, _Key):
            yield from (a for a in node.args if isinstance(a, _String))
        elif isinstance(node, _Not):
            yield from _strings(node.query)
        else:
            yield from _strings(node.left)
            yield from _strings(node.right)


def _node_text(node: _Node) -> str:
    if isinstance(node, _Key):
        return " ".join([node.name, *map(str, node.args)])
    if isinstance(node, _Not):
        return f"NOT {_group_text(node.query)}"
    return f"OR {_group_text(node.left)} {_group_text(node.right)}"


def _group_text(query: SearchQuery) -> str:
    return str(query) if len(query.keys) == 1 else f"({query})"


def _encode_keys(keys: tuple[_Node, ...], out: list[bytes | ImapLiteral]) -> None:
    for index, node in enumerate(keys):
        if index:
            out.append(b" ")
        if isinstance(node, _Key):
            out.append(node.name.encode("ascii"))
            for arg in node.args:
                out.append(b" ")
                out.append(_encode_arg(arg))
        elif isinstance(node, _Not):
            out.append(b"NOT ")
            _encode_group(node.query, out)
        else:
            out.append(b"OR ")
            _encode_group(node.left, out)
            out.append(b" ")
            _encode_group(node.right, out)


def _encode_group(query: SearchQuery, out: list[bytes | ImapLiteral]) -> None:
    """One search-key: a single key as it is, several in parentheses (RFC 3501 section 9)."""
    keys = query.keys or (_Key("ALL"),)
    if len(keys) == 1:
        _encode_keys(keys, out)
        return
    out.append(b"(")
    _encode_keys(keys, out)
    out.append(b")")


def _encode_arg(arg: _Arg) -> bytes | ImapLiteral:
    if isinstance(arg, _Atom):
        return arg.text.encode("ascii")
    if _quotable(arg.value):
        return _quoted(arg.value).encode("ascii")
    return ImapLiteral(arg.value.encode("utf-8"))


def _quotable(value: str) -> bool:
    # quoted = DQUOTE *QUOTED-CHAR DQUOTE; QUOTED-CHAR is 7-bit TEXT-CHAR (no CR, LF, NUL).
    return value.isascii() and not any(c in value for c in "\r\n\0")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _merge(pieces: list[bytes | ImapLiteral]) -> list[bytes | ImapLiteral]:
    merged: list[bytes | ImapLiteral] = []
    for piece in pieces:
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


# --- the builder --------------------------------------------------------------------------------


def _text(value: str, what: str) -> _String:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL character, which IMAP cannot carry (RFC 3501 9)")
    return _String(value)


def _date(value: date, what: str) -> _Atom:
    """IMAP date (RFC 3501 section 9, ``date``): 1-Feb-2024, months in English whatever the
    locale. A datetime is cut to its date as given: IMAP date searches ignore time and zone."""
    if isinstance(value, datetime):
        value = value.date()
    if not isinstance(value, date):
        raise TypeError(f"{what} must be a date, not {type(value).__name__}")
    return _Atom(f"{value.day}-{_MONTHS[value.month - 1]}-{value.year:04d}")


def _number(value: int, what: str) -> _Atom:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _MAX_NUMBER:
        raise ValueError(f"{what} must be between 0 and {_MAX_NUMBER}, not {value}")
    return _Atom(str(value))


def uid_set_text(uids: str | int | range | Iterable[int]) -> str:
    """An IMAP sequence set from "1:100" / "5,7:*", one UID, a range or UIDs (compressed)."""
    if isinstance(uids, bool):
        raise TypeError("a UID set cannot be a bool")
    if isinstance(uids, int):
        uids = [uids]
    if isinstance(uids, str):
        if not _SEQUENCE_SET.match(uids) or any(
            part != "*" and int(part) > _MAX_NUMBER for part in re.split("[:,]", uids)
        ):
            raise ValueError(f"not an IMAP UID set: {uids!r} (expected e.g. '1:100' or '5,7:*')")
        return uids
    if isinstance(uids, range) and uids.step == 1:
        if not uids:
            raise ValueError("an empty UID range matches nothing and cannot be sent")
        return uid_set_text(f"{uids.start}:{uids.stop - 1}") if len(uids) > 1 else str(uids.start)
    numbers = sorted(set(uids))
    if not numbers:
        raise ValueError("an empty UID set matches nothing and cannot be sent")
    for n in numbers:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_NUMBER:
            raise ValueError(f"a UID is a number from 1 to {_MAX_NUMBER}, not {n!r}")
    return uid_set(numbers)


Part: TypeAlias = "SearchQueryBuilder | SearchQuery"


class SearchQueryBuilder:
    """Builds a ``SearchQuery``; every method returns a new builder (this one is unchanged).

    Keys accumulate with AND. ``or_(a, b, ...)`` adds one key matching any of the parts and
    ``not_(part)`` one key matching what the part does not; a part is a builder or a query, and
    a part of several keys is their AND.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: tuple[_Node, ...] = ()) -> None:
        self._keys = keys

    def get(self) -> SearchQuery:
        return SearchQuery(self._keys)

    def __repr__(self) -> str:
        return f"SearchQueryBuilder({self.get()})"

    def _add(self, node: _Node) -> SearchQueryBuilder:
        return SearchQueryBuilder((*self._keys, node))

    def _key(self, name: str, *args: _Arg) -> SearchQueryBuilder:
        return self._add(_Key(name, args))

    # combinators

    def not_(self, part: Part) -> SearchQueryBuilder:
        """Messages that do not match ``part`` (all of its keys)."""
        return self._add(_Not(_query(part)))

    def or_(self, first: Part, second: Part, *more: Part) -> SearchQueryBuilder:
        """Messages matching at least one of the parts (``OR a (OR b c)`` on the wire)."""
        parts = [_query(p) for p in (first, second, *more)]
        node = _Or(parts[-2], parts[-1])
        for part in reversed(parts[:-2]):
            node = _Or(part, SearchQuery((node,)))
        return self._add(node)

    def all(self) -> SearchQueryBuilder:
        return self._key("ALL")

    # addresses and text: substring matches, case-insensitive (RFC 3501 section 6.4.4)

    def from_(self, value: str) -> SearchQueryBuilder:
        return self._key("FROM", _text(value, "from_"))

    def to(self, value: str) -> SearchQueryBuilder:
        return self._key("TO", _text(value, "to"))

    def cc(self, value: str) -> SearchQueryBuilder:
        return self._key("CC", _text(value, "cc"))

    def bcc(self, value: str) -> SearchQueryBuilder:
        return self._key("BCC", _text(value, "bcc"))

    def subject(self, value: str) -> SearchQueryBuilder:
        return self._key("SUBJECT", _text(value, "subject"))

    def body(self, value: str) -> SearchQueryBuilder:
        return self._key("BODY", _text(value, "body"))

    def text(self, value: str) -> SearchQueryBuilder:
        """In the headers or the body."""
        return self._key("TEXT", _text(value, "text"))

    def header(self, name: str, value: str) -> SearchQueryBuilder:
        """Header ``name`` contains ``value`` (an empty value: the message has the header)."""
        if not isinstance(name, str) or not _FIELD_NAME.match(name):
            raise ValueError(f"not a header field name: {name!r}")
        return self._key("HEADER", _Atom(name), _text(value, "header value"))

    # dates: the internal date (arrival), or with sent_* the Date header; days, not times

    def since(self, day: date) -> SearchQueryBuilder:
        """Arrived on or after ``day``."""
        return self._key("SINCE", _date(day, "since"))

    def before(self, day: date) -> SearchQueryBuilder:
        """Arrived before ``day`` (not on it)."""
        return self._key("BEFORE", _date(day, "before"))

    def on(self, day: date) -> SearchQueryBuilder:
        return self._key("ON", _date(day, "on"))

    def sent_since(self, day: date) -> SearchQueryBuilder:
        return self._key("SENTSINCE", _date(day, "sent_since"))

    def sent_before(self, day: date) -> SearchQueryBuilder:
        return self._key("SENTBEFORE", _date(day, "sent_before"))

    def sent_on(self, day: date) -> SearchQueryBuilder:
        return self._key("SENTON", _date(day, "sent_on"))

    # flags

    def seen(self) -> SearchQueryBuilder:
        return self._key("SEEN")

    def unseen(self) -> SearchQueryBuilder:
        return self._key("UNSEEN")

    def flagged(self) -> SearchQueryBuilder:
        return self._key("FLAGGED")

    def unflagged(self) -> SearchQueryBuilder:
        return self._key("UNFLAGGED")

    def answered(self) -> SearchQueryBuilder:
        return self._key("ANSWERED")

    def unanswered(self) -> SearchQueryBuilder:
        return self._key("UNANSWERED")

    def deleted(self) -> SearchQueryBuilder:
        return self._key("DELETED")

    def undeleted(self) -> SearchQueryBuilder:
        return self._key("UNDELETED")

    def draft(self) -> SearchQueryBuilder:
        return self._key("DRAFT")

    def undraft(self) -> SearchQueryBuilder:
        return self._key("UNDRAFT")

    def keyword(self, flag: str) -> SearchQueryBuilder:
        """Has the keyword ``flag`` (``$Forwarded``, ``Work``)."""
        return self._key("KEYWORD", _keyword(flag))

    def unkeyword(self, flag: str) -> SearchQueryBuilder:
        return self._key("UNKEYWORD", _keyword(flag))

    # sizes (RFC822.SIZE, in bytes) and UIDs

    def larger(self, size: int) -> SearchQueryBuilder:
        """Strictly larger than ``size`` bytes."""
        return self._key("LARGER", _number(size, "larger"))

    def smaller(self, size: int) -> SearchQueryBuilder:
        """Strictly smaller than ``size`` bytes."""
        return self._key("SMALLER", _number(size, "smaller"))

    def uid(self, uids: str | int | range | Iterable[int]) -> SearchQueryBuilder:
        """UIDs in a set: ``"1:100"``, ``"5,7:*"``, ``42``, ``range(1, 101)`` or a list.

        ``n:*`` also matches the highest UID when it is below n (RFC 3501 section 6.4.8), so
        ``ImapEmailManager.search_uids`` drops UIDs below a ``n:*`` lower bound.
        """
        return self._key("UID", _Atom(uid_set_text(uids)))


def _keyword(flag: str) -> _Atom:
    if not isinstance(flag, str) or not _KEYWORD.match(flag):
        raise ValueError(f"not an IMAP keyword: {flag!r}")
    return _Atom(flag)


def _query(part: Part) -> SearchQuery:
    if isinstance(part, SearchQueryBuilder):
        return part.get()
    if isinstance(part, SearchQuery):
        return part
    raise TypeError(f"expected a SearchQueryBuilder or SearchQuery, not {type(part).__name__}")


def lowest_open_uid(query: SearchQuery) -> int | None:
    """The ``n`` of a top-level ``UID n:*`` key, whose ``*`` can match a UID below ``n``."""
    lowest: int | None = None
    for node in query.keys:
        if isinstance(node, _Key) and node.name == "UID":
            text = str(node.args[0])
            if "," not in text and text.endswith(":*") and text[:-2].isdigit():
                lowest = max(lowest or 0, int(text[:-2]))
    return lowest
