"""Folders: names (modified UTF-7), types (SPECIAL-USE or well-known names), the LIST tree."""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from imapclient import imap_utf7

from mailferry.errors import NotFound
from mailferry.imap.connection import ImapConnector, imap_errors
from mailferry.messages import FolderInfo, FolderType

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


def list_folders(connector: ImapConnector) -> list[FolderInfo]:
    """Every folder, flat, in the server's order (one ``LIST "" "*"``)."""
    with imap_errors(connector.where):
        listed = connector.client.list_folders()
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


def encode_folder_name(name: str | Folder | FolderInfo) -> str:
    """The wire name of a folder: modified UTF-7 of a display name (RFC 3501 section 5.1.3),
    or the name itself when it already is valid modified UTF-7 (a ``raw_name``)."""
    if isinstance(name, Folder | FolderInfo):
        return name.raw_name
    if any(c in name for c in "\r\n\0"):
        raise ValueError(f"a folder name cannot contain CR, LF or NUL: {name!r}")
    if name.isascii():
        if "&" not in name:
            return name
        try:
            if imap_utf7.encode(imap_utf7.decode(name.encode("ascii"))).decode("ascii") == name:
                return name
        except ValueError:  # "AT&T" is a display name, not modified UTF-7
            pass
    return str(imap_utf7.encode(name).decode("ascii"))


@dataclass(frozen=True)
class Folder:
    """One folder of the tree. ``path`` is the full name users see (``Données/Été``), ``name``
    its last part (``Été``), ``raw_name`` the full name on the wire (``Donn&AOk-es/&AMk-t&AOk-``).
    A parent the server did not list is shown with ``\\NonExistent`` and not selectable."""

    name: str
    path: str
    raw_name: str
    delimiter: str | None
    type: FolderType
    flags: tuple[str, ...]
    selectable: bool
    children: tuple[Folder, ...] = ()

    def walk(self) -> Iterator[Folder]:
        """This folder, then its descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict."""
        return {
            "name": self.name, "path": self.path, "raw_name": self.raw_name,
            "delimiter": self.delimiter, "type": self.type, "flags": list(self.flags),
            "selectable": self.selectable, "children": [c.to_dict() for c in self.children],
        }


class ImapEmailFolderManager:
    """The account's folders, as the server lists them (one ``LIST "" "*"``)."""

    def __init__(self, connector: ImapConnector) -> None:
        self.connector = connector

    def list_folders(self) -> list[FolderInfo]:
        """Every folder, flat, in the server's order (what the sync stores)."""
        return list_folders(self.connector)

    def get_folders(self, parent: str | Folder | None = None, recursive: bool = True) -> list[Folder]:
        """The folders under ``parent`` (``None``: the top level; a display or raw name), as a
        tree when ``recursive``, otherwise only the direct children (with no ``children``).
        The inbox comes first, then names in case-insensitive order. ``NotFound`` when the
        server has no folder ``parent``."""
        roots = folder_tree(self.list_folders())
        if parent is None:
            found = roots
        else:
            wanted = encode_folder_name(parent)
            path = parent.path if isinstance(parent, Folder) else parent
            node = next((f for r in roots for f in r.walk()
                         if f.raw_name == wanted or f.path == path
                         or (wanted.upper() == "INBOX" and f.raw_name.upper() == "INBOX")), None)
            if node is None:
                raise NotFound(f"{self.connector.where}: no folder {parent!r}")
            found = list(node.children)
        if recursive:
            return found
        return [dataclasses.replace(f, children=()) for f in found]


def folder_tree(infos: Iterable[FolderInfo]) -> list[Folder]:
    """Nest a flat LIST into trees by the hierarchy delimiter; returns the top-level folders."""
    infos = list(infos)
    by_raw = {f.raw_name: f for f in infos}
    kids: dict[str | None, list[str]] = {}

    def parent_of(raw: str, delimiter: str | None) -> str | None:
        if not delimiter or delimiter not in raw.strip(delimiter):
            return None
        return raw.rstrip(delimiter).rsplit(delimiter, 1)[0]

    def place(raw: str, delimiter: str | None) -> None:
        parent = parent_of(raw, delimiter)
        if parent is not None and parent not in by_raw:
            # Listed "A/B" without "A" (RFC 3501 6.3.8 allows it): show "A" as a placeholder.
            name, _ = decode_folder_name(parent.encode("utf-8", "surrogateescape"))
            by_raw[parent] = FolderInfo(name=name, raw_name=parent, delimiter=delimiter,
                                        flags=("\\NonExistent",), selectable=False,
                                        type=folder_type(name, delimiter, ()))
            place(parent, delimiter)
        kids.setdefault(parent, []).append(raw)

    for info in infos:
        place(info.raw_name, info.delimiter)

    def build(raw: str) -> Folder:
        info = by_raw[raw]
        leaf = info.name.rsplit(info.delimiter, 1)[-1] if info.delimiter else info.name
        return Folder(name=leaf or info.name, path=info.name, raw_name=info.raw_name,
                      delimiter=info.delimiter, type=info.type, flags=info.flags,
                      selectable=info.selectable, children=_ordered(build(k) for k in kids.get(raw, ())))

    return list(_ordered(build(raw) for raw in kids.get(None, ())))


def _ordered(folders: Iterable[Folder]) -> tuple[Folder, ...]:
    """The inbox first, then by name, case and accents aside ("Été" before "Hiver")."""
    return tuple(sorted(folders, key=lambda f: (f.type != "inbox", _fold(f.name), f.raw_name)))


def _fold(name: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", name.casefold())
                   if not unicodedata.combining(c))
