"""Product rules shared by several services (OroCRM ImapBundle behaviour users expect)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from shared.messages import FolderInfo

DEFAULT_FOLDER_TYPES = ("inbox", "sent")
CREDENTIAL_CAPABILITY = "imap_sync_origin_credential_notifications"


def enabled_on_discovery(folder: FolderInfo, initial_folders: Sequence[str] | None,
                         first_listing: bool = True) -> bool:
    """Whether a folder seen for the first time is synchronized.

    The mailbox's ``--folders`` selection names folders as the user sees them (or by raw name);
    without one, the inbox and the sent folder found at the mailbox's first listing are. A folder
    that appears later stays disabled until the user enables it, unless the selection names it.
    """
    if not folder.selectable:
        return False
    if initial_folders is None:
        return first_listing and folder.type in DEFAULT_FOLDER_TYPES
    wanted = {f.casefold() for f in initial_folders}
    return folder.name.casefold() in wanted or folder.raw_name.casefold() in wanted


def first_sync_since(today: date, days: int) -> date:
    """The first sync of a folder loads only mail from the last ``days`` days (default a year)."""
    return today - timedelta(days=days)
