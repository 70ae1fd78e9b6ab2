"""How a mailbox's --folders names find the server's folders (shared.domain.resolve_selection)."""

from __future__ import annotations

import pytest

from mailferry.domain import resolve_selection
from mailferry.messages import FolderInfo, FolderType


def _folder(name: str, kind: FolderType = "other", delimiter: str = ".") -> FolderInfo:
    return FolderInfo(name=name, raw_name=name, delimiter=delimiter, type=kind)


COURIER = [_folder("INBOX", "inbox"), _folder("INBOX.Sent", "sent"),
           _folder("INBOX.Projects.2026"), _folder("INBOX.Gesendet", "sent")]
TYPES: dict[str, FolderType] = {"sent": "sent", "archive": "archive"}


@pytest.mark.parametrize(("name", "expected"), [
    ("INBOX", "INBOX"),
    ("inbox.sent", "INBOX.Sent"),  # the name itself, case aside
    ("Sent", "INBOX.Sent"),  # under the personal namespace
    ("2026", "INBOX.Projects.2026"),  # the one folder whose last segment it is
    ("Archive", None),  # nothing of that name or type
])
def test_a_selected_name_resolves_under_the_personal_namespace(name: str,
                                                               expected: str | None) -> None:
    [found] = resolve_selection(COURIER, [name], "INBOX.", TYPES)
    assert found.raw_name == expected


def test_a_name_standing_for_a_type_resolves_only_when_one_folder_has_that_type() -> None:
    one = [_folder("INBOX", "inbox"), _folder("INBOX.Gesendet", "sent")]
    assert resolve_selection(one, ["Sent"], "INBOX.", TYPES)[0].resolved_as == "INBOX.Gesendet"
    two = [*one, _folder("INBOX.Sent Items", "sent")]
    assert resolve_selection(two, ["Sent"], "INBOX.", TYPES)[0].raw_name is None


def test_unselectable_folders_are_never_selected() -> None:
    folders = [FolderInfo(name="INBOX.Sent", raw_name="INBOX.Sent", delimiter=".",
                          type="sent", selectable=False)]
    assert resolve_selection(folders, ["Sent"], "INBOX.", TYPES)[0].raw_name is None
