"""Every message that crosses the broker, in one module.

Commands are imperative (``SyncMailbox``), events past tense (``MessagesFetched``). Each is a frozen
pydantic model with a ``type`` and a ``version``; the type also travels as the AMQP ``type``
property so the management UI shows it. Messages carry ids, never credentials (DESIGN invariant 4).
Raw message bytes travel base64-encoded inside the JSON body.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

FolderType = Literal["inbox", "sent", "drafts", "trash", "spam", "archive", "other"]
ErrorKind = Literal["auth", "connection", "tls", "protocol", "timeout", "config", "broker", "folder",
                    "internal"]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")
    routing_key: ClassVar[str]
    version: int = 1


# --- commands -------------------------------------------------------------------------------


class SyncMailbox(_Message):
    """Fetch what is new in a mailbox's enabled folders (one per due mailbox, or by hand)."""

    routing_key: ClassVar[str] = "sync-mailbox"
    type: Literal["SyncMailbox"] = "SyncMailbox"
    run_id: uuid.UUID
    mailbox_id: int
    force: bool = False
    requested_by: str = "scheduler"


class SyncFolders(_Message):
    """Refresh a mailbox's folder list only (its folder selection changed), not its mail."""

    routing_key: ClassVar[str] = "sync-folders"
    type: Literal["SyncFolders"] = "SyncFolders"
    run_id: uuid.UUID
    mailbox_id: int
    requested_by: str = "cli"
    force: bool = False


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


class SyncFinished(FetcherEvent):
    routing_key: ClassVar[str] = "sync.finished"
    type: Literal["SyncFinished"] = "SyncFinished"
    folders: int  # FolderSynced events published in this attempt
    finished_at: datetime


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


AnyMessage = Annotated[
    SyncMailbox
    | SyncFolders
    | SyncStarted
    | FoldersListed
    | MessagesFetched
    | FlagsChanged
    | MessagesExpunged
    | FolderSynced
    | SyncFinished
    | SyncFailed
    | CredentialsInvalid
    | CredentialsRestored,
    Field(discriminator="type"),
]
_ANY: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


def encode(message: _Message) -> bytes:
    return message.model_dump_json().encode()


def decode(body: bytes | str) -> AnyMessage:
    """Parse any message; raises ``pydantic.ValidationError`` on a malformed one (permanent)."""
    return _ANY.validate_json(body)
