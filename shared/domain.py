"""Product rules shared by several services (OroCRM ImapBundle behaviour users expect)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from mailferry.messages import FolderInfo, FolderSelection, FolderType

DEFAULT_FOLDER_TYPES = ("inbox", "sent")
CREDENTIAL_CAPABILITY = "imap_sync_origin_credential_notifications"


def enabled_on_discovery(folder: FolderInfo, initial_folders: Sequence[str] | None,
                         first_listing: bool = True,
                         selection: Sequence[FolderSelection] | None = None) -> bool:
    """Whether a folder seen for the first time is synchronized.

    The mailbox's ``--folders`` selection names folders as the user sees them (or by raw name),
    resolved against the server's folders by :func:`resolve_selection` (``selection``, when the
    fetcher sent it); without a selection, the inbox and the sent folder found at the mailbox's
    first listing are. A folder that appears later stays disabled until the user enables it,
    unless the selection names it.
    """
    if not folder.selectable:
        return False
    if initial_folders is None:
        return first_listing and folder.type in DEFAULT_FOLDER_TYPES
    if selection is not None:
        return any(s.raw_name == folder.raw_name for s in selection)
    wanted = {f.casefold() for f in initial_folders}
    return folder.name.casefold() in wanted or folder.raw_name.casefold() in wanted


def resolve_selection(folders: Sequence[FolderInfo], names: Sequence[str],
                      personal_prefix: str = "", type_of: dict[str, FolderType] | None = None,
                      ) -> tuple[FolderSelection, ...]:
    """Each selected name's folder on this server, or ``None`` when it has none.

    In order: the name itself (as users see it, or the raw name); the name under the server's
    personal namespace (RFC 2342: ``Sent`` is ``INBOX.Sent`` on Courier, whose prefix is
    ``INBOX.``); the one folder under that namespace whose last path segment is the name; the one
    folder there whose type the name stands for (``Sent`` for the ``\\Sent`` folder, whatever
    its name). Ambiguity resolves nothing: a guess would sync the wrong folder silently.
    """
    selectable = [f for f in folders if f.selectable]
    under = [f for f in selectable if f.name.casefold().startswith(personal_prefix.casefold())]
    out: list[FolderSelection] = []
    for name in names:
        wanted = name.casefold()
        exact = [f for f in selectable if wanted in (f.name.casefold(), f.raw_name.casefold())]
        prefixed = [f for f in selectable
                    if personal_prefix and f.name.casefold() == (personal_prefix + name).casefold()]
        leaf = [f for f in under if _leaf(f).casefold() == wanted]
        kind = (type_of or {}).get(wanted)
        kind = kind if kind not in (None, "other", "inbox") else None
        typed = [f for f in under if kind is not None and f.type == kind]
        found = next((c[0] for c in (exact, prefixed, leaf, typed) if len(c) == 1), None)
        out.append(FolderSelection(name=name, raw_name=found.raw_name if found else None,
                                   resolved_as=found.name if found else None))
    return tuple(out)


def _leaf(folder: FolderInfo) -> str:
    return folder.name.rsplit(folder.delimiter, 1)[-1] if folder.delimiter else folder.name


def first_sync_since(today: date, days: int) -> date:
    """The first sync of a folder loads only mail from the last ``days`` days (default a year)."""
    return today - timedelta(days=days)
