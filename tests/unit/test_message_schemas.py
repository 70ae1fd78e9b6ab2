"""Broker message schemas: raw bytes survive, commands carry ids only (DESIGN invariant 4)."""
from __future__ import annotations

import uuid

from mailferry import messages


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
    assert fields == {"version", "type", "run_id", "mailbox_id", "force", "requested_by",
                      "folders"}


def test_a_version_1_sync_command_still_decodes_and_means_every_enabled_folder() -> None:
    run_id = uuid.uuid4()
    old = (f'{{"type":"SyncMailbox","version":1,"run_id":"{run_id}","mailbox_id":3,'
           '"force":false,"requested_by":"scheduler"}')
    decoded = messages.decode(old)
    assert isinstance(decoded, messages.SyncMailbox)
    assert (decoded.version, decoded.folders) == (1, None)


def test_a_push_command_names_the_folders_that_changed_and_says_version_2() -> None:
    cmd = messages.SyncMailbox(run_id=uuid.uuid4(), mailbox_id=3, requested_by="push",
                               folders=("INBOX", "Work"))
    decoded = messages.decode(messages.encode(cmd))
    assert decoded == cmd
    assert isinstance(decoded, messages.SyncMailbox) and decoded.version == 2
