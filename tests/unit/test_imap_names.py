"""IMAP names and sets as mailferry writes and reads them: UID sets, folder types, folder names."""
from __future__ import annotations

import pytest

from mailferry.imap import decode_folder_name, folder_type
from mailferry.imap.wire import uid_set


@pytest.mark.parametrize(("uids", "expected"), [
    ([], ""),
    ([7], "7"),
    ([1, 2, 3, 7], "1:3,7"),
    ([1, 3, 5], "1,3,5"),
    ([4, 5, 9, 10, 11, 20], "4:5,9:11,20"),
])
def test_uid_sets_are_compressed_into_ranges(uids: list[int], expected: str) -> None:
    assert uid_set(uids) == expected


@pytest.mark.parametrize(("name", "delimiter", "flags", "expected"), [
    ("INBOX", "/", [], "inbox"),
    ("inbox", ".", [], "inbox"),
    ("Gesendet", "/", [b"\\Sent"], "sent"),
    ("[Gmail]/Spam", "/", [b"\\Junk", b"\\HasNoChildren"], "spam"),
    ("INBOX.Sent Items", ".", [], "sent"),
    ("Deleted Messages", "/", [], "trash"),
    ("Projects/Drafts", "/", [], "drafts"),
    ("Archive", "/", [b"\\Archive"], "archive"),
    ("Sentimental", "/", [], "other"),
])
def test_folder_types_come_from_special_use_then_well_known_names(
    name: str, delimiter: str, flags: list[bytes], expected: str
) -> None:
    assert folder_type(name, delimiter, flags) == expected


def test_modified_utf7_folder_names_are_decoded_for_display_and_kept_raw() -> None:
    assert decode_folder_name(b"Donn&AOk-es/&AMk-t&AOk-") == ("Données/Été", "Donn&AOk-es/&AMk-t&AOk-")
    assert decode_folder_name(b"Tom &- Jerry") == ("Tom & Jerry", "Tom &- Jerry")


def test_a_server_sending_raw_utf8_folder_names_gets_them_shown_as_utf8() -> None:
    name, _raw = decode_folder_name("Été".encode())
    assert name == "Été"
