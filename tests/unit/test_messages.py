"""The broker codec: every message survives a round trip, old bodies still decode, and a body
that lies about its bytes is a clear permanent error."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from mailferry import messages
from mailferry.messages import FetchedMessage, MalformedMessage, MessagesFetched

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
RUN = uuid.UUID(int=7)
IDS = {"run_id": RUN, "mailbox_id": 3, "lease_token": 2}
RAW = b"Subject: hi\r\n\r\n" + bytes(range(256))  # not UTF-8: raw bytes must survive as they are


def _batch(*raws: bytes | None) -> MessagesFetched:
    return MessagesFetched(**IDS, folder="INBOX", uidvalidity=9, batch_no=1, messages=tuple(
        FetchedMessage(uid=i + 1, flags=("\\Seen",), internal_date=NOW, size=len(r or b"x"),
                       modseq=5, raw=r, skipped_reason=None if r is not None else "too big")
        for i, r in enumerate(raws)))


EVERY_MESSAGE: list[messages._Message] = [
    messages.SyncMailbox(run_id=RUN, mailbox_id=3, force=True),
    messages.SyncFolders(run_id=RUN, mailbox_id=3),
    messages.SyncStarted(**IDS, fetcher="f-1", started_at=NOW),
    messages.FoldersListed(**IDS, folders=(messages.FolderInfo(
        name="Entwürfe", raw_name="Entw&APw-rfe", delimiter="/", flags=("\\Drafts",),
        type="drafts"),), first_listing=True),
    _batch(RAW, None, b"", RAW[:20]),
    _batch(),
    messages.FlagsChanged(**IDS, folder="INBOX", uidvalidity=9, batch_no=2,
                          changes=(messages.FlagChange(uid=1, flags=("\\Flagged",), modseq=8),)),
    messages.MessagesExpunged(**IDS, folder="INBOX", uidvalidity=9, batch_no=3, uids=(4, 5)),
    messages.FolderSynced(**IDS, folder="INBOX", uidvalidity=9, uidnext=10, highest_modseq=8,
                          last_uid=9, batches=4, messages=3),
    messages.SyncFinished(**IDS, folders=1, finished_at=NOW),
    messages.SyncCompleted(**IDS, fetcher="f-1", started_at=NOW, folders=(messages.FolderInfo(
        name="INBOX", raw_name="INBOX", delimiter="/", type="inbox"),),
        synced=(messages.FolderChecked(folder="INBOX", uidvalidity=9, uidnext=10,
                                       highest_modseq=8, last_uid=9),), finished_at=NOW),
    messages.SyncFailed(**IDS, error_kind="auth", error="refused", finished_at=NOW),
    messages.CredentialsInvalid(mailbox_id=3, run_id=RUN, error="refused", detected_at=NOW),
    messages.CredentialsRestored(mailbox_id=3, restored_at=NOW),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: f"{m.type}")
def test_every_message_type_survives_a_round_trip(message: messages._Message) -> None:
    assert messages.decode(messages.encode(message)) == message


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: f"{m.type}")
def test_only_a_batch_of_mail_is_a_blobs_body_and_others_stay_plain_json(
    message: messages._Message
) -> None:
    body = messages.encode(message)
    if isinstance(message, MessagesFetched):
        assert messages.content_type(message) == messages.BLOBS_CONTENT_TYPE
    else:
        assert messages.content_type(message) == messages.JSON_CONTENT_TYPE
        assert json.loads(body)["type"] == message.type


def test_a_batch_body_is_readable_json_then_the_raw_bytes_unencoded() -> None:
    body = messages.encode(_batch(RAW, None, b"tail"))
    json_part, _, blobs = body.partition(b"\n")
    head = json.loads(json_part)
    assert (head["type"], head["version"]) == ("MessagesFetched", 2)
    assert [m["raw_length"] for m in head["messages"]] == [len(RAW), None, 4]
    assert "raw" not in head["messages"][0]
    assert blobs == RAW + b"tail"
    assert messages.split_body(body) == (json_part, len(RAW) + 4)


def test_a_version_1_body_with_base64_inside_the_json_still_decodes() -> None:
    # as the fetcher published it before version 2 (messages left in queues while upgrading)
    old = json.dumps({
        "version": 1, "type": "MessagesFetched", "run_id": str(RUN), "mailbox_id": 3,
        "lease_token": 2, "folder": "INBOX", "uidvalidity": 9, "batch_no": 1,
        "messages": [{"uid": 1, "flags": ["\\Seen"], "internal_date": NOW.isoformat(),
                      "size": len(RAW), "modseq": 5, "raw": base64.b64encode(RAW).decode(),
                      "skipped_reason": None}],
    })
    for body in (old, old.encode()):  # the transport hands JSON bodies over as text
        decoded = messages.decode(body)
        assert isinstance(decoded, MessagesFetched) and decoded.version == 1
        assert decoded.messages[0].raw == RAW
        assert messages.split_body(body) == (body, 0)


def test_a_blobs_body_the_transport_handed_over_as_text_still_decodes() -> None:
    event = _batch(b"plain ascii mail\r\n")
    assert messages.decode(messages.encode(event).decode()) == event


def _lying(edit: dict[str, object], index: int | None = None) -> bytes:
    json_part, _, blobs = messages.encode(_batch(RAW, b"second")).partition(b"\n")
    head = json.loads(json_part)
    (head if index is None else head["messages"][index]).update(edit)
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + blobs


@pytest.mark.parametrize(("body", "says"), [
    (messages.encode(_batch(RAW))[:-1], "announces"),  # truncated
    (messages.encode(_batch(RAW)) + b"!", "announces"),  # bytes nobody announced
    (_lying({"raw_length": len(RAW) + 1}, 0), "does not fit"),
    (_lying({"raw_length": 1}, 1), "belong to no message"),
    (_lying({"raw_length": -1}, 0), "does not fit"),
    (_lying({"raw_length": "12"}, 0), "does not fit"),
    (_lying({"blob_bytes": 10**12}), "announces"),
    (_lying({"messages": "none"}), "no list of messages"),
], ids=["truncated", "trailing", "too-long", "too-short", "negative", "string", "total", "shape"])
def test_a_body_that_lies_about_its_bytes_is_a_malformed_message(body: bytes, says: str) -> None:
    with pytest.raises(MalformedMessage, match=says):
        messages.decode(body)


def test_a_lying_body_that_frames_well_is_still_refused_by_the_schema() -> None:
    with pytest.raises(ValidationError):
        messages.decode(_lying({"uid": "not a number"}, 0))
    with pytest.raises(ValidationError):
        messages.decode(b'{"type": "MessagesFetched"}\n\x00\xff')  # no blob_bytes: plain JSON


def test_decoding_copies_each_raw_message_out_of_the_body_once() -> None:
    event = messages.decode(messages.encode(_batch(RAW, RAW)))
    assert isinstance(event, MessagesFetched)
    first, second = (m.raw for m in event.messages)
    assert type(first) is bytes and first == second and first is not second


def _attempt_events(*synced: messages.FolderSynced) -> list[messages.FetcherEvent]:
    inbox = messages.FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox")
    return [messages.SyncStarted(**IDS, fetcher="f-1", started_at=NOW),
            messages.FoldersListed(**IDS, folders=(inbox,)), *synced]


def test_a_sync_without_message_data_is_one_event_that_stands_for_the_same_events() -> None:
    events = _attempt_events(messages.FolderSynced(
        **IDS, folder="INBOX", uidvalidity=9, uidnext=10, highest_modseq=8, last_uid=9,
        batches=0, messages=0))
    finished = messages.SyncFinished(**IDS, folders=1, finished_at=NOW)

    completed = messages.SyncCompleted.of(events, finished)

    assert completed is not None
    assert completed.parts() == [*events, finished]


def test_a_sync_with_a_batch_or_a_folder_not_accounted_for_is_not_one_event() -> None:
    with_batch = _attempt_events(messages.FolderSynced(
        **IDS, folder="INBOX", uidvalidity=9, last_uid=9, batches=1, messages=1))
    assert messages.SyncCompleted.of(
        with_batch, messages.SyncFinished(**IDS, folders=1, finished_at=NOW)) is None
    assert messages.SyncCompleted.of(
        _attempt_events(), messages.SyncFinished(**IDS, folders=1, finished_at=NOW)) is None
    assert messages.SyncCompleted.of(
        _attempt_events()[:1], messages.SyncFinished(**IDS, folders=0, finished_at=NOW)) is None
