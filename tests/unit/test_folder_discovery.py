"""Which folders a new mailbox syncs, and how far back its first sync goes (mailferry.domain)."""
from __future__ import annotations

from datetime import date

from mailferry import messages
from mailferry.domain import enabled_on_discovery, first_sync_since
from mailferry.messages import FolderInfo


def _folder(name: str, type_: messages.FolderType = "other", selectable: bool = True) -> FolderInfo:
    return FolderInfo(name=name, raw_name=name, delimiter="/", type=type_, selectable=selectable)


def test_without_a_selection_only_the_inbox_and_sent_folders_are_enabled_on_discovery() -> None:
    assert enabled_on_discovery(_folder("INBOX", "inbox"), None)
    assert enabled_on_discovery(_folder("Sent Items", "sent"), None)
    assert not enabled_on_discovery(_folder("Trash", "trash"), None)


def test_a_folder_appearing_after_the_first_listing_waits_to_be_enabled() -> None:
    assert not enabled_on_discovery(_folder("Sent 2", "sent"), None, first_listing=False)
    assert enabled_on_discovery(_folder("Projets"), ["Projets"], first_listing=False)


def test_a_selection_names_folders_case_insensitively_and_never_unselectable_ones() -> None:
    assert enabled_on_discovery(_folder("Projets/Été"), ["projets/été"])
    assert not enabled_on_discovery(_folder("INBOX", "inbox"), ["Projets/Été"])
    assert not enabled_on_discovery(_folder("Projets", selectable=False), ["Projets"])


def test_the_first_sync_window_counts_back_from_today() -> None:
    assert first_sync_since(date(2026, 11, 27), 365) == date(2025, 11, 27)
