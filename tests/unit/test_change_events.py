"""Change events (the stream for integrators): routing keys, stable ids, what they carry."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime

from mailferry import messages, outbox


def test_routing_keys_name_the_mailbox_and_the_event_in_snake_case() -> None:
    assert messages.change_routing_key(7, "MessageStored") == "mailbox.7.message_stored"
    assert (messages.change_routing_key(7, "MessageFlagsChanged")
            == "mailbox.7.message_flags_changed")
    assert messages.change_routing_key(12, "CredentialsInvalid") == "mailbox.12.credentials_invalid"


def test_a_change_id_is_the_same_whenever_the_same_change_is_described() -> None:
    assert outbox.change_id(1, 2, 7, 5, "stored") == outbox.change_id(1, 2, 7, 5, "stored")
    assert outbox.change_id(1, 2, 7, 5, "stored") != outbox.change_id(1, 2, 8, 5, "stored")


def test_a_stored_message_event_carries_metadata_and_never_a_body_or_credentials() -> None:
    fields = set(messages.MessageStored.model_fields)
    assert not fields & {"raw", "body", "body_text", "body_html", "password", "username", "host"}
    event = messages.MessageStored(
        id=uuid.uuid4(), mailbox_id=1, seq=3, occurred_at=datetime.now(UTC), folder="INBOX",
        folder_id=2, uidvalidity=7, uid=5, message_ref=9, backfill=False,
        **{"from": "alice@example.com"})
    wire = event.model_dump(mode="json")
    assert wire["from"] == "alice@example.com" and "from_" not in wire
    assert messages.decode_change(event.model_dump_json()) == event
