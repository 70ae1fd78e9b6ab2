"""Pure functions: no I/O."""

from __future__ import annotations

import uuid
from datetime import date

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from mailferry import messages
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.domain import enabled_on_discovery, first_sync_since
from mailferry.errors import ConfigError
from mailferry.imap import decode_folder_name, folder_type
from mailferry.imap.wire import uid_set
from mailferry.logging import mask_url, redact
from mailferry.messages import FolderInfo
from mailferry.services.cli.main import _progress_line, _visible


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


def test_log_lines_never_carry_passwords_or_url_credentials() -> None:
    event = redact(None, "info", {"password": "hunter2", "broker_url": "amqp://u:hunter2@h//",
                                  "lease_token": 4, "event": "x"})
    assert event == {"password": "***", "broker_url": "amqp://u:***@h//", "lease_token": 4,
                     "event": "x"}
    assert mask_url("postgresql://postgres@127.0.0.1/db") == "postgresql://postgres@127.0.0.1/db"


def test_passwords_round_trip_and_survive_a_key_rotation() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = PasswordBox(SecretStr(old)).encrypt("pässword")
    rotating = PasswordBox(SecretStr(f"{new},{old}"))
    rotated = rotating.rotate(token)
    assert PasswordBox(SecretStr(new)).decrypt(rotated) == "pässword"
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        PasswordBox(SecretStr(new)).decrypt(token)


def test_a_missing_or_malformed_secret_key_is_a_clear_configuration_error() -> None:
    with pytest.raises(ConfigError, match="MAILFERRY_SECRET_KEY is not set"):
        PasswordBox(None)
    with pytest.raises(ConfigError, match="Fernet keys"):
        PasswordBox(SecretStr("not-a-key"))


def test_settings_read_comma_separated_retry_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILFERRY_RETRY_DELAYS", "1, 2.5,10")
    assert Settings().retry_delays == (1.0, 2.5, 10.0)


def test_messages_round_trip_with_raw_bytes_intact() -> None:
    raw = bytes(range(256)) * 3
    event = messages.MessagesFetched(
        run_id=uuid.uuid4(), mailbox_id=1, lease_token=3, folder="INBOX", uidvalidity=1,
        batch_no=0, messages=(messages.FetchedMessage(uid=1, size=len(raw), raw=raw),))
    decoded = messages.decode(messages.encode(event))
    assert decoded == event
    assert isinstance(decoded, messages.MessagesFetched)
    assert decoded.messages[0].raw == raw


def test_a_command_carries_ids_and_never_connection_settings() -> None:
    fields = set(messages.SyncMailbox.model_fields)
    assert fields == {"version", "type", "run_id", "mailbox_id", "force", "requested_by"}


def _run(status: str, folders_total: int | None = None, found: int = 0, done: int = 0,
         folders_done: int = 0) -> dict[str, object]:
    return {"status": status, "folders_total": folders_total, "messages_found": found,
            "messages_done": done, "folders_done": folders_done}


def test_the_progress_bar_waits_for_a_fetcher_before_anything_is_known() -> None:
    assert _progress_line([_run("queued")]) == "waiting for a fetcher (0/1 mailboxes done)"


def test_the_progress_bar_fills_with_stored_messages_of_all_runs() -> None:
    line = _progress_line([_run("running", 4, found=300, done=100, folders_done=1),
                           _run("done", 2, found=100, done=100, folders_done=2)], width=10)
    assert line == "[#####-----] 200/400 messages  3/6 folders  1/2 mailboxes"


def test_a_finished_run_counts_whole_even_when_it_failed_half_way() -> None:
    line = _progress_line([_run("failed", 3, found=50, done=20, folders_done=1)], width=4)
    assert line == "[####] 50/50 messages  3/3 folders  1/1 mailboxes"


def test_text_from_servers_and_users_cannot_drive_an_operators_terminal() -> None:
    assert _visible("Inbox\r\nFAKE LINE\x1b[2J") == "Inbox\\r\\nFAKE LINE\\x1b[2J"
    assert _visible("Données/Été 日本") == "Données/Été 日本"
