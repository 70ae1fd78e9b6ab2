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
    assert fields == {"version", "type", "run_id", "mailbox_id", "force", "requested_by"}
