"""Every message that crosses the broker, in one module.

Commands are imperative (``SyncMailbox``), events past tense (``MessagesFetched``). Each is a frozen
pydantic model with a ``type`` and a ``version``; the type also travels as the AMQP ``type``
property so the management UI shows it. Messages carry ids, never credentials (DESIGN invariant 4).

Bodies are JSON, except for events that carry raw RFC 822 bytes (``MessagesFetched``, version 2):
their body (content type :data:`BLOBS_CONTENT_TYPE`) is the JSON of the event with each message's
``raw`` replaced by ``raw_length``, one ``\\n``, then the raw bytes concatenated in message order::

    {"type":"MessagesFetched",...,"messages":[{"uid":7,...,"raw_length":5}],"blob_bytes":5}\\n
    hello

Compact JSON never holds a raw newline byte (one in a string is escaped), so the first ``\\n``
ends the JSON part, and a human looking at the queue in the management UI reads it first.
Version 1 carried the bytes base64-encoded inside the JSON: 80 MiB of mail cost the persister
875 MB of memory (the base64 text, its decoded str, the JSON parse, the bytes) and the broker
4/3 of each email's size. Version 1 bodies still decode, for messages queued during an upgrade.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Annotated, Any, ClassVar, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from mailferry.errors import ErrorKind, PermanentError

JSON_CONTENT_TYPE = "application/json"
#: JSON metadata, a newline, then the raw message bytes (see the module docstring).
BLOBS_CONTENT_TYPE = "application/vnd.mailferry.blobs"

FolderType = Literal["inbox", "sent", "drafts", "trash", "spam", "archive", "other"]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    routing_key: ClassVar[str]
    version: int = 1


# --- commands -------------------------------------------------------------------------------


class SyncMailbox(_Message):
    """Fetch what is new in a mailbox's enabled folders (one per due mailbox, or by hand).

    Version 2 added ``folders``: a push-triggered run names the folders that changed (raw
    names, as the server spells them), and only those of the enabled folders are synced,
    without listing the mailbox when the store knows them all (renamed and deleted folders wait
    for a run that lists). Version 1 commands (no ``folders``) still decode and sync every
    enabled folder."""

    routing_key: ClassVar[str] = "sync-mailbox"
    type: Literal["SyncMailbox"] = "SyncMailbox"
    version: int = 2
    run_id: uuid.UUID
    mailbox_id: int
    force: bool = False
    # Who asked: scheduler, cli, push, ... A command published by hand without it (the
    # management UI, another application) is recorded as asked for by "broker".
    requested_by: str = "broker"
    # Only these enabled folders (raw names); None: every enabled folder.
    folders: tuple[str, ...] | None = None


class SyncFolders(_Message):
    """Refresh a mailbox's folder list only (its folder selection changed), not its mail."""

    routing_key: ClassVar[str] = "sync-folders"
    type: Literal["SyncFolders"] = "SyncFolders"
    run_id: uuid.UUID
    mailbox_id: int
    requested_by: str = "broker"
    force: bool = False


class FolderResume(BaseModel):
    """Where a sliced sync stopped inside a folder's new mail: every UID below ``next_uid`` of
    ``uidvalidity`` was published, in ``events`` numbered events (the next ``batch_no``)."""

    model_config = ConfigDict(frozen=True)
    folder: str  # raw name
    uidvalidity: int
    next_uid: int
    above: int  # the checkpoint this folder's sync started from (0: a first sync)
    events: int
    messages: int
    # The download budget's order (shared/budget.py): a first sync under a budget goes newest
    # first, and ``next_uid - 1`` is then the top it covers; ``below``: that descending pass (or
    # a backfill of an earlier cut first sync) has fetched everything from here up, and goes on
    # below it.
    newest_first: bool = False
    below: int | None = None


class ContinueSync(_Message):
    """Go on with an attempt that stopped at a slice boundary (``MAILFERRY_FETCHER_SLICE_SECONDS``)
    so that no delivery stays unacknowledged for long (RabbitMQ's ``consumer_timeout``).

    Published by the fetcher of the slice before, which then acked its own command; it carries
    that attempt's fencing token, which the next slice takes over (the lease is handed over, not
    taken), so the events already published stay valid. The plan travels with it: the folders
    still to sync and, for a folder left midway, where to resume."""

    routing_key: ClassVar[str] = "continue-sync"
    type: Literal["ContinueSync"] = "ContinueSync"
    run_id: uuid.UUID
    mailbox_id: int
    lease_token: int
    slice: int  # 2 for the second slice of the attempt, ...
    force: bool = False
    requested_by: str = "broker"
    since: date  # the first-sync window of the attempt
    folders: tuple[FolderInfo, ...]  # still to sync, in order; the first one may be resumed
    resume: FolderResume | None = None
    folders_done: int  # FolderSynced events the attempt published so far
    failed_folders: int = 0
    messages: int = 0  # published so far (for the log line)


# --- events from the fetcher -----------------------------------------------------------------


class FetcherEvent(_Message):
    """An event of one fetcher attempt at one run; ``lease_token`` fences stale attempts."""

    run_id: uuid.UUID
    mailbox_id: int
    lease_token: int


class SyncStarted(FetcherEvent):
    routing_key: ClassVar[str] = "sync.started"
    type: Literal["SyncStarted"] = "SyncStarted"
    fetcher: str
    started_at: datetime


class FolderInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str  # as the user sees it (modified UTF-7 decoded, RFC 3501 5.1.3)
    raw_name: str  # as the server names it on the wire
    delimiter: str | None
    flags: tuple[str, ...] = ()
    type: FolderType = "other"
    selectable: bool = True
    # Only for folders new to the store while others vanished: a rename keeps its UIDVALIDITY.
    uidvalidity: int | None = None
    # A folder recognised by its content as the rename of a vanished one (servers such as
    # Courier give a renamed folder a new UIDVALIDITY): the vanished folder's raw name.
    renamed_from: str | None = None


class FolderSelection(BaseModel):
    """One name of a mailbox's ``--folders`` selection, resolved against the server's folders."""

    model_config = ConfigDict(frozen=True)
    name: str  # as the user gave it
    raw_name: str | None  # the folder it selects; None when the server has no such folder
    resolved_as: str | None = None  # that folder's name as users see it ("Sent" -> "INBOX.Sent")


class FoldersListed(FetcherEvent):
    routing_key: ClassVar[str] = "folders.listed"
    type: Literal["FoldersListed"] = "FoldersListed"
    folders: tuple[FolderInfo, ...]
    # The store knew no folder of this mailbox when the fetcher started: the defaults for a
    # mailbox's first listing apply (decided once, by the fetcher, so both sides agree).
    first_listing: bool = False
    # The mailbox's --folders selection resolved against this listing (None: no selection, or
    # an older fetcher); decided by the fetcher, so both sides enable the same folders.
    selection: tuple[FolderSelection, ...] | None = None


class FetchedMessage(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    uid: int
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None
    size: int
    modseq: int | None = None
    raw: bytes | None  # exactly the BODY[] bytes the server returned; None when not carried
    skipped_reason: str | None = None
    # Not carried because the store already holds these bytes (hex SHA-256): a message of the
    # folder's previous UIDVALIDITY recognised under its new UID (a reset, or a rename that got a
    # new UIDVALIDITY). Persisters must be upgraded before fetchers that send it.
    sha256: str | None = None


class MessagesFetched(FetcherEvent):
    routing_key: ClassVar[str] = "messages.fetched"
    type: Literal["MessagesFetched"] = "MessagesFetched"
    version: int = 2  # 2: raw bytes after the JSON (BLOBS_CONTENT_TYPE); 1: base64 inside it
    folder: str  # raw name
    uidvalidity: int
    batch_no: int
    messages: tuple[FetchedMessage, ...]


class FlagChange(BaseModel):
    model_config = ConfigDict(frozen=True)
    uid: int
    flags: tuple[str, ...]
    modseq: int | None = None


class FlagsChanged(FetcherEvent):
    """Current flags of messages already stored (CHANGEDSINCE, or a full pass without CONDSTORE)."""

    routing_key: ClassVar[str] = "messages.flags"
    type: Literal["FlagsChanged"] = "FlagsChanged"
    folder: str
    uidvalidity: int
    batch_no: int
    changes: tuple[FlagChange, ...]


class MessagesExpunged(FetcherEvent):
    """UIDs gone from the folder (expunged or moved away); they become tombstones."""

    routing_key: ClassVar[str] = "messages.expunged"
    type: Literal["MessagesExpunged"] = "MessagesExpunged"
    folder: str
    uidvalidity: int
    batch_no: int
    uids: tuple[int, ...]


class FolderSynced(FetcherEvent):
    """Closes one folder of one attempt: ``batches`` MessagesFetched, FlagsChanged and
    MessagesExpunged events (numbered together by ``batch_no``) were published before it.

    The persister moves the folder's checkpoint to ``last_uid`` only once all those batches are
    stored, so a checkpoint never runs ahead of the data it stands for.
    """

    routing_key: ClassVar[str] = "folder.synced"
    type: Literal["FolderSynced"] = "FolderSynced"
    folder: str
    uidvalidity: int | None
    uidnext: int | None = None
    highest_modseq: int | None = None
    last_uid: int | None = None  # None: do not move the checkpoint (the folder failed)
    batches: int
    messages: int
    error: str | None = None
    # A first sync cut by the download budget (newest mail first): UIDs below this one, in the
    # first-sync window, are still to fetch. None: nothing is pending.
    backfill_below: int | None = None


class SyncFinished(FetcherEvent):
    routing_key: ClassVar[str] = "sync.finished"
    type: Literal["SyncFinished"] = "SyncFinished"
    folders: int  # FolderSynced events published in this attempt
    finished_at: datetime


class FolderChecked(BaseModel):
    """One folder of a :class:`SyncCompleted`: what its FolderSynced said (with no batches)."""

    model_config = ConfigDict(frozen=True)
    folder: str  # raw name
    uidvalidity: int | None
    uidnext: int | None = None
    highest_modseq: int | None = None
    last_uid: int | None = None
    error: str | None = None
    backfill_below: int | None = None


class SyncCompleted(FetcherEvent):
    """A whole attempt that published no message data, as one event: what its SyncStarted,
    FoldersListed, FolderSynced events (none with batches) and SyncFinished would have said.

    A no-op sync of an unchanged mailbox is most syncs; as separate events it cost the persister
    four transactions or more, as this one event it costs one with the same outcome (the
    persister applies :meth:`parts` in order, in one transaction). An attempt that published a
    batch publishes its events one by one, as before; a persister still takes those."""

    routing_key: ClassVar[str] = "sync.completed"
    type: Literal["SyncCompleted"] = "SyncCompleted"
    fetcher: str
    started_at: datetime
    folders: tuple[FolderInfo, ...]  # the listing (FoldersListed)
    first_listing: bool = False
    selection: tuple[FolderSelection, ...] | None = None
    synced: tuple[FolderChecked, ...]  # in the order they were synced
    finished_at: datetime

    @classmethod
    def of(cls, events: Sequence[FetcherEvent], finished: SyncFinished) -> SyncCompleted | None:
        """The attempt's held events and its SyncFinished as one event; None when they cannot
        be one (no single listing, a folder with batches, another kind of event)."""
        listed = [e for e in events if isinstance(e, FoldersListed)]
        started = [e for e in events if isinstance(e, SyncStarted)]
        synced = [e for e in events if isinstance(e, FolderSynced)]
        if (len(listed) != 1 or len(started) != 1 or len(listed) + len(started) + len(synced)
                != len(events) or any(e.batches or e.messages for e in synced)
                or len(synced) != finished.folders):
            return None
        return cls(run_id=finished.run_id, mailbox_id=finished.mailbox_id,
                   lease_token=finished.lease_token, fetcher=started[0].fetcher,
                   started_at=started[0].started_at, folders=listed[0].folders,
                   first_listing=listed[0].first_listing, selection=listed[0].selection,
                   synced=tuple(FolderChecked(
                       folder=e.folder, uidvalidity=e.uidvalidity, uidnext=e.uidnext,
                       highest_modseq=e.highest_modseq, last_uid=e.last_uid, error=e.error,
                       backfill_below=e.backfill_below) for e in synced),
                   finished_at=finished.finished_at)

    def parts(self) -> list[FetcherEvent]:
        """The events this one stands for, in the order the fetcher made them."""
        run, mailbox, token = self.run_id, self.mailbox_id, self.lease_token
        return [
            SyncStarted(run_id=run, mailbox_id=mailbox, lease_token=token, fetcher=self.fetcher,
                        started_at=self.started_at),
            FoldersListed(run_id=run, mailbox_id=mailbox, lease_token=token,
                          folders=self.folders, first_listing=self.first_listing,
                          selection=self.selection),
            *(FolderSynced(run_id=run, mailbox_id=mailbox, lease_token=token, folder=f.folder,
                           uidvalidity=f.uidvalidity, uidnext=f.uidnext,
                           highest_modseq=f.highest_modseq, last_uid=f.last_uid, error=f.error,
                           backfill_below=f.backfill_below, batches=0, messages=0)
              for f in self.synced),
            SyncFinished(run_id=run, mailbox_id=mailbox, lease_token=token,
                         folders=len(self.synced), finished_at=self.finished_at),
        ]


class SyncFailed(FetcherEvent):
    routing_key: ClassVar[str] = "sync.failed"
    type: Literal["SyncFailed"] = "SyncFailed"
    error_kind: ErrorKind
    error: str
    finished_at: datetime


# --- credential events, for the notifier -----------------------------------------------------


class CredentialsInvalid(_Message):
    routing_key: ClassVar[str] = "credentials.invalid"
    type: Literal["CredentialsInvalid"] = "CredentialsInvalid"
    mailbox_id: int
    run_id: uuid.UUID | None = None
    error: str
    detected_at: datetime


class CredentialsRestored(_Message):
    routing_key: ClassVar[str] = "credentials.restored"
    type: Literal["CredentialsRestored"] = "CredentialsRestored"
    mailbox_id: int
    restored_at: datetime


ContinueSync.model_rebuild()

#: The commands, all published to ``topology.COMMANDS`` and consumed by fetchers.
COMMANDS = (SyncMailbox, SyncFolders, ContinueSync)


# --- change events, for integrators (the ``mailferry.changes`` exchange) ------------------------
#
# Written to the outbox (``shared/outbox.py``) in the transaction that made the change, then
# published by the relay with routing key ``mailbox.<mailbox id>.<event>``, ``<event>`` being the
# type in snake case (``mailbox.7.message_stored``). Delivered at least once, in ``seq`` order per
# mailbox; ``id`` is the same on every delivery of one change, so a consumer drops what it has
# seen. They carry ids and metadata, never bodies nor credentials: a body is read with
# ``mailferry messages raw ID`` (``message_ref``) or the library.


class ChangeEvent(_Message):
    """What every change event carries."""

    id: uuid.UUID  # stable: a replay of the same change has the same id
    mailbox_id: int
    seq: int  # per mailbox, from 1, gap-free, in the order the changes were committed
    occurred_at: datetime  # when the store recorded it


class MessageStored(ChangeEvent):
    """A message was stored in a folder (one event per folder placement: a copy in two folders
    is two events). ``backfill``: stored by a folder's first sync (or after a UIDVALIDITY
    reset) or by a re-scan (``sync --force``) of UIDs the store had already passed: old mail, not
    new mail. ``known``: the mailbox already held the same bytes (a move or copy between
    folders, or mail seen again under a new UIDVALIDITY); mailferry does not emit MessageMoved."""

    type: Literal["MessageStored"] = "MessageStored"
    folder: str  # as users see it
    folder_id: int
    uidvalidity: int
    uid: int
    modseq: int | None = None
    message_ref: int | None  # `mailferry messages raw <message_ref>`; None: bytes not carried
    message_id: str | None = None  # the Message-ID header
    subject: str | None = None
    from_: str | None = Field(default=None, alias="from")
    date: datetime | None = None  # the Date header
    internal_date: datetime | None = None
    flags: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None  # hex, of the raw bytes
    backfill: bool
    known: bool = False
    skipped_reason: str | None = None
    #: False: the message is stored (bytes and placement) but not parsed yet, so ``message_id``,
    #: ``subject``, ``from`` and ``date`` are null; a MessageParsed with the same
    #: ``message_ref`` follows once they are known (first syncs and re-scans are parsed after
    #: they are stored; new mail is parsed as it is stored).
    parsed: bool = True

    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class MessageParsed(ChangeEvent):
    """A stored message was parsed: its headers are known now (one event per message, whatever
    the folders it is in; the MessageStored events of its placements said ``parsed: false``).
    ``parse_errors``: how many defects the parse recorded (the message is stored whole
    anyway)."""

    type: Literal["MessageParsed"] = "MessageParsed"
    message_ref: int  # the MessageStored events' ``message_ref``
    message_id: str | None = None
    subject: str | None = None
    from_: str | None = Field(default=None, alias="from")
    date: datetime | None = None
    sha256: str  # hex, of the raw bytes
    parse_errors: int = 0

    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class MessageFlagsChanged(ChangeEvent):
    type: Literal["MessageFlagsChanged"] = "MessageFlagsChanged"
    folder: str
    folder_id: int
    uidvalidity: int
    uid: int
    modseq: int | None = None
    flags: tuple[str, ...]
    previous_flags: tuple[str, ...]
    message_ref: int | None = None


class MessageExpunged(ChangeEvent):
    """A stored message left a folder (expunged, or moved away: a move is an expunge here and a
    MessageStored with ``known: true`` there)."""

    type: Literal["MessageExpunged"] = "MessageExpunged"
    folder: str
    folder_id: int
    uidvalidity: int
    uid: int
    message_ref: int | None = None


class FolderCreated(ChangeEvent):
    type: Literal["FolderCreated"] = "FolderCreated"
    folder: str
    folder_id: int
    folder_type: FolderType = "other"
    sync_enabled: bool


class FolderRenamed(ChangeEvent):
    type: Literal["FolderRenamed"] = "FolderRenamed"
    folder: str
    folder_id: int
    previous_name: str


class FolderDeleted(ChangeEvent):
    """A folder gone from the server. ``kept``: it holds synced mail, so the store keeps it
    (marked gone) with its mail; otherwise its row is deleted."""

    type: Literal["FolderDeleted"] = "FolderDeleted"
    folder: str
    folder_id: int
    kept: bool


class MailboxSyncFailed(ChangeEvent):
    type: Literal["MailboxSyncFailed"] = "MailboxSyncFailed"
    run_id: uuid.UUID
    error_kind: ErrorKind
    error: str


class MailboxCredentialsInvalid(ChangeEvent):
    """The server refused the mailbox's credentials (the first refusal after they worked)."""

    type: Literal["CredentialsInvalid"] = "CredentialsInvalid"
    error: str


class MailboxCredentialsRestored(ChangeEvent):
    """A sync completed again after the credentials had been refused."""

    type: Literal["CredentialsRestored"] = "CredentialsRestored"


AnyChange = Annotated[
    MessageStored
    | MessageParsed
    | MessageFlagsChanged
    | MessageExpunged
    | FolderCreated
    | FolderRenamed
    | FolderDeleted
    | MailboxSyncFailed
    | MailboxCredentialsInvalid
    | MailboxCredentialsRestored,
    Field(discriminator="type"),
]
_ANY_CHANGE: TypeAdapter[AnyChange] = TypeAdapter(AnyChange)
CHANGE_TYPES: tuple[type[ChangeEvent], ...] = (
    MessageStored, MessageParsed, MessageFlagsChanged, MessageExpunged, FolderCreated,
    FolderRenamed, FolderDeleted, MailboxSyncFailed, MailboxCredentialsInvalid, MailboxCredentialsRestored)


def change_routing_key(mailbox_id: int, type_: str) -> str:
    """``mailbox.<id>.<type in snake case>``: ``mailbox.7.message_stored``."""
    return f"mailbox.{mailbox_id}.{_snake(type_)}"


def decode_change(body: bytes | str | dict[str, Any]) -> AnyChange:
    """Parse a change event (a body from ``mailferry.changes``, or an outbox row's payload)."""
    if isinstance(body, dict):
        return _ANY_CHANGE.validate_python(body)
    return _ANY_CHANGE.validate_json(body)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower()
                   for i, c in enumerate(name))


AnyMessage = Annotated[
    SyncMailbox
    | SyncFolders
    | ContinueSync
    | SyncStarted
    | FoldersListed
    | MessagesFetched
    | FlagsChanged
    | MessagesExpunged
    | FolderSynced
    | SyncFinished
    | SyncCompleted
    | SyncFailed
    | CredentialsInvalid
    | CredentialsRestored,
    Field(discriminator="type"),
]
_ANY: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


class MalformedMessage(PermanentError):
    """A body whose framing is broken: truncated, or its JSON part lies about the bytes after it.
    Like a ``pydantic.ValidationError``, the same body fails the same way every time."""


def content_type(message: _Message) -> str:
    """The AMQP ``content_type`` of :func:`encode`'s body for ``message``."""
    return BLOBS_CONTENT_TYPE if isinstance(message, MessagesFetched) else JSON_CONTENT_TYPE


def encode(message: _Message) -> bytes:
    """The body to publish; for ``MessagesFetched`` the raw bytes are appended as they are, so
    the only copy of them made here is the body itself (no base64, no big JSON string)."""
    if not isinstance(message, MessagesFetched):
        return message.model_dump_json().encode()
    head: dict[str, Any] = message.model_dump(mode="json",
                                              exclude={"messages": {"__all__": {"raw"}}})
    blobs = [m.raw for m in message.messages if m.raw is not None]
    for item, m in zip(head["messages"], message.messages, strict=True):
        item["raw_length"] = None if m.raw is None else len(m.raw)
    head["blob_bytes"] = sum(len(b) for b in blobs)
    return b"".join([pydantic_core.to_json(head), b"\n", *blobs])


def split_body(body: bytes | str) -> tuple[bytes | str, int]:
    """(the JSON part, how many bytes of raw messages follow it): for showing a body to a
    person. A plain JSON body is all JSON part."""
    newline = body.find(b"\n") if isinstance(body, bytes) else body.find("\n")
    if newline < 0 or not _is_blobs_head(body[:newline]):
        return body, 0
    return body[:newline], len(body) - newline - 1


def decode(body: bytes | str) -> AnyMessage:
    """Parse any message, in either body format; raises ``pydantic.ValidationError`` or
    :class:`MalformedMessage` on a malformed one (both permanent)."""
    newline = body.find(b"\n") if isinstance(body, bytes) else body.find("\n")
    if newline < 0:
        return _ANY.validate_json(body)  # plain JSON, including version 1 MessagesFetched
    head = _is_blobs_head(body[:newline])
    if head is None:
        return _ANY.validate_json(body)  # JSON with whitespace: the validator judges it
    if isinstance(body, str):  # the transport decoded the body by its content_encoding
        body = body.encode("utf-8", "surrogateescape")
        newline = body.index(b"\n")
    return _ANY.validate_python(_attach_blobs(head, memoryview(body)[newline + 1:]))


def _is_blobs_head(part: bytes | str) -> dict[str, Any] | None:
    """The JSON part of a blobs body, parsed; None if ``part`` is not one."""
    if not (part.startswith(b"{") if isinstance(part, bytes) else part.startswith("{")):
        return None
    try:
        head = pydantic_core.from_json(part)
    except ValueError:
        return None
    return head if isinstance(head, dict) and "blob_bytes" in head else None


def _attach_blobs(head: dict[str, Any], blobs: memoryview) -> dict[str, Any]:
    """``head`` with each message's ``raw`` cut from ``blobs``: one copy of each message's
    bytes; every length is checked against what the body really holds."""
    if head.get("blob_bytes") != len(blobs):
        raise MalformedMessage(f"the JSON part announces {head.get('blob_bytes')!r} bytes of "
                               f"raw messages, the body holds {len(blobs)}")
    items = head.get("messages")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise MalformedMessage("the JSON part of a blobs body has no list of messages")
    offset = 0
    for item in items:
        length = item.pop("raw_length", None)
        if length is None:
            item["raw"] = None
            continue
        if type(length) is not int or length < 0 or offset + length > len(blobs):
            raise MalformedMessage(f"message uid {item.get('uid')!r}: raw_length {length!r} "
                                   f"does not fit the {len(blobs) - offset} bytes left")
        item["raw"] = bytes(blobs[offset:offset + length])
        offset += length
    if offset != len(blobs):
        raise MalformedMessage(f"{len(blobs) - offset} bytes of raw messages belong to no "
                               "message")
    return head
