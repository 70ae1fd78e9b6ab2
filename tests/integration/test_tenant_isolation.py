"""One person's mail and notifications never show up for another.

Three mailboxes (alice's, bob's and a system mailbox) are filled through the persister's own
event handler, with a folder of the same name in each and one message whose bytes are identical
in alice's and bob's mailboxes (stored once, by SHA-256). Their credentials are then refused, so
the notifier's own handler tells the people allowed to fix each mailbox.

``mailferry messages raw ID`` takes a global message id and has no owner option: it is an
operator command, like the rest of the CLI, and is tested here only for serving the bytes of the
message it names.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.fernet import Fernet

from mailferry import db, repository
from mailferry.devkit import services
from mailferry.domain import CREDENTIAL_CAPABILITY
from mailferry.errors import PermanentError
from mailferry.messages import (
    AnyMessage,
    CredentialsInvalid,
    FetchedMessage,
    FolderInfo,
    FoldersListed,
    FolderSynced,
    MessagesExpunged,
    MessagesFetched,
    SyncFinished,
    SyncStarted,
)
from mailferry.notifications import list_notifications, pop_notifications
from mailferry.services.notifier.handlers import NotifierDeps
from mailferry.services.notifier.handlers import handle as notify
from mailferry.services.persister import store
from mailferry.services.persister.handlers import PersisterDeps, event_given_up
from mailferry.services.persister.handlers import handle as persist
from mailferry.sync_requests import request_syncs

NOW = datetime(2026, 11, 1, tzinfo=UTC)
SAME = b"Subject: same\r\nMessage-ID: <same@example.com>\r\n\r\nidentical bytes in two mailboxes\r\n"
SHARED_FOLDER = "Shared Name"


def _raw(subject: str) -> bytes:
    return f"Subject: {subject}\r\nMessage-ID: <{subject}@example.com>\r\n\r\n{subject}\r\n".encode()


@dataclass
class World:
    conn: db.Connection
    env: dict[str, str]
    deps: PersisterDeps
    mailboxes: dict[str, int]  # alice, bob, system -> mailbox id
    runs: dict[str, uuid.UUID]

    def messages(self, who: str, *extra: str) -> list[dict[str, Any]]:
        result = services.run_cli(["messages", "list", "--mailbox", str(self.mailboxes[who]),
                                   "--json", *extra], self.env)
        assert result.returncode == 0, result.stderr.decode()
        return list(json.loads(result.stdout))

    def message_id(self, who: str, subject: str) -> int:
        row = self.conn.execute("SELECT id FROM messages WHERE mailbox_id = %s AND subject = %s",
                                (self.mailboxes[who], subject)).fetchone()
        assert row is not None
        return int(row["id"])


def _user(conn: db.Connection, email: str, capabilities: list[str] | None = None,
          enabled: bool = True) -> int:
    row = conn.execute("INSERT INTO users (email, capabilities, enabled) VALUES (%s, %s, %s) "
                       "RETURNING id", (email, capabilities or [], enabled)).fetchone()
    assert row is not None
    return int(row["id"])


def _sync(conn: db.Connection, mailbox_id: int, inbox: list[tuple[bytes, tuple[str, ...]]],
          shared: bytes) -> tuple[uuid.UUID, list[AnyMessage]]:
    """A complete sync of INBOX (uidvalidity 7) and SHARED_FOLDER (uidvalidity 9)."""
    run_id = uuid.uuid4()
    conn.execute("INSERT INTO sync_runs (id, mailbox_id, status, requested_by) "
                 "VALUES (%s, %s, 'queued', 'test')", (run_id, mailbox_id))
    common: dict[str, Any] = {"run_id": run_id, "mailbox_id": mailbox_id, "lease_token": 1}
    folders = (FolderInfo(name="INBOX", raw_name="INBOX", delimiter="/", type="inbox"),
               FolderInfo(name=SHARED_FOLDER, raw_name=SHARED_FOLDER, delimiter="/"))
    fetched = tuple(FetchedMessage(uid=uid, flags=flags, internal_date=NOW, size=len(raw), raw=raw)
                    for uid, (raw, flags) in enumerate(inbox, 1))
    events: list[AnyMessage] = [
        SyncStarted(**common, fetcher="test", started_at=NOW),
        FoldersListed(**common, folders=folders, first_listing=False),
        MessagesFetched(**common, folder="INBOX", uidvalidity=7, batch_no=0, messages=fetched),
        MessagesFetched(**common, folder=SHARED_FOLDER, uidvalidity=9, batch_no=0, messages=(
            FetchedMessage(uid=1, internal_date=NOW, size=len(shared), raw=shared),)),
        FolderSynced(**common, folder="INBOX", uidvalidity=7, uidnext=len(inbox) + 1,
                     last_uid=len(inbox), batches=1, messages=len(inbox)),
        FolderSynced(**common, folder=SHARED_FOLDER, uidvalidity=9, uidnext=2, last_uid=1,
                     batches=1, messages=1),
        SyncFinished(**common, folders=2, finished_at=NOW),
    ]
    return run_id, events


def _build(conn: db.Connection, cli_env: dict[str, str], database_url: str) -> World:
    alice = _user(conn, "alice@example.com")
    bob = _user(conn, "bob@example.com")
    _user(conn, "carol@example.com", [CREDENTIAL_CAPABILITY])  # may fix system mailboxes
    _user(conn, "dave@example.com", [CREDENTIAL_CAPABILITY], enabled=False)
    _user(conn, "eve@example.com")  # owns nothing, may fix nothing
    mailboxes = {name: services.mailbox_row(conn, name=name, owner=owner, username=name,
                                            host="imap.example.com")
                 for name, owner in (("alice", alice), ("bob", bob), ("system", None))}
    deps = PersisterDeps(connection=db.Reconnecting(database_url))
    runs = {}
    contents = {
        "alice": ([(_raw("a-private"), ()), (SAME, ("\\Seen",))], _raw("a-folder")),
        "bob": ([(_raw("b-private"), ("\\Flagged",)), (SAME, ())], _raw("b-folder")),
        "system": ([(_raw("s-private"), ())], _raw("s-folder")),
    }
    for who, (inbox, shared) in contents.items():
        runs[who], events = _sync(conn, mailboxes[who], inbox, shared)
        for event in events:
            persist(event, deps)
    assert conn.execute("SELECT status FROM sync_runs").fetchall() == [{"status": "done"}] * 3
    services.parse_stored(conn)  # the persisters' parse step, after the first syncs
    # Every mailbox's credentials refused, told through the notifier's own handler.
    notifier = NotifierDeps(connection=lambda: conn, reminder_seconds=86400)
    for mailbox_id in mailboxes.values():
        notify(CredentialsInvalid(mailbox_id=mailbox_id, error="refused", detected_at=NOW),
               notifier)
    return World(conn, cli_env, deps, mailboxes, runs)


def _cli_env(database_url: str) -> dict[str, str]:
    """Only PostgreSQL: the commands used here never touch the broker (no vhost to make)."""
    return {"MAILFERRY_DATABASE_URL": database_url,
            "MAILFERRY_SECRET_KEY": Fernet.generate_key().decode()}


@pytest.fixture(scope="module")
def world(migrated_template: str) -> Iterator[World]:
    """One world for the tests that only read it."""
    with services.private_database(template=migrated_template) as database_url, \
            db.connect(database_url, autocommit=True) as conn:
        yield _build(conn, _cli_env(database_url), database_url)


@pytest.fixture
def own_world(conn: db.Connection, database_url: str) -> World:
    """A world of its own, for a test that changes it."""
    return _build(conn, _cli_env(database_url), database_url)


def _subjects(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["folder"], m["subject"]) for m in messages)


# --- messages ---------------------------------------------------------------------------------


def test_messages_list_of_a_mailbox_shows_only_that_mailboxs_messages(world: World) -> None:
    assert _subjects(world.messages("alice")) == [
        ("INBOX", "a-private"), ("INBOX", "same"), (SHARED_FOLDER, "a-folder")]
    assert _subjects(world.messages("bob")) == [
        ("INBOX", "b-private"), ("INBOX", "same"), (SHARED_FOLDER, "b-folder")]
    assert _subjects(world.messages("system")) == [("INBOX", "s-private"), (SHARED_FOLDER, "s-folder")]


def test_folders_with_the_same_name_in_two_mailboxes_stay_separate(world: World) -> None:
    assert _subjects(world.messages("alice", "--folder", SHARED_FOLDER)) == [
        (SHARED_FOLDER, "a-folder")]
    rows = world.conn.execute("SELECT mailbox_id FROM folders WHERE name = %s ORDER BY mailbox_id",
                              (SHARED_FOLDER,)).fetchall()
    assert [r["mailbox_id"] for r in rows] == sorted(world.mailboxes.values())
    a = store.folder_id(world.conn, world.mailboxes["alice"], SHARED_FOLDER)
    b = store.folder_id(world.conn, world.mailboxes["bob"], SHARED_FOLDER)
    assert a != b


def test_identical_bytes_in_two_mailboxes_are_stored_once_as_two_messages(world: World) -> None:
    digest = hashlib.sha256(SAME).digest()
    assert world.conn.execute("SELECT count(*) AS n FROM raw_messages WHERE sha256 = %s",
                              (digest,)).fetchone() == {"n": 1}
    owners = world.conn.execute("SELECT mailbox_id FROM messages WHERE sha256 = %s "
                                "ORDER BY mailbox_id", (digest,)).fetchall()
    assert [r["mailbox_id"] for r in owners] == [world.mailboxes["alice"], world.mailboxes["bob"]]
    seen = world.conn.execute(
        """SELECT f.mailbox_id, mf.seen FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
             JOIN messages g ON g.id = mf.message_id WHERE g.sha256 = %s ORDER BY 1""",
        (digest,)).fetchall()
    assert seen == [{"mailbox_id": world.mailboxes["alice"], "seen": True},  # each mailbox keeps
                    {"mailbox_id": world.mailboxes["bob"], "seen": False}]  # its own flags


def test_expunging_shared_bytes_in_one_mailbox_leaves_the_other_mailboxs_copy(
    own_world: World,
) -> None:
    persist(MessagesExpunged(run_id=own_world.runs["alice"], mailbox_id=own_world.mailboxes["alice"],
                             lease_token=1, folder="INBOX", uidvalidity=7, batch_no=1, uids=(2,)),
            own_world.deps)
    assert "same" not in {m["subject"] for m in own_world.messages("alice")}
    assert "same" in {m["subject"] for m in own_world.messages("bob")}
    raw = services.run_cli(["messages", "raw", str(own_world.message_id("bob", "same"))], own_world.env)
    assert raw.stdout == SAME


def test_deleting_one_mailbox_keeps_the_other_mailboxs_messages_and_their_bytes(
    own_world: World,
) -> None:
    own_world.conn.execute("DELETE FROM mailboxes WHERE id = %s", (own_world.mailboxes["alice"],))
    assert _subjects(own_world.messages("bob")) == [
        ("INBOX", "b-private"), ("INBOX", "same"), (SHARED_FOLDER, "b-folder")]
    raw = services.run_cli(["messages", "raw", str(own_world.message_id("bob", "same"))], own_world.env)
    assert raw.stdout == SAME


def test_messages_raw_serves_the_bytes_of_the_message_it_names(world: World) -> None:
    for who, subject in (("alice", "a-private"), ("bob", "b-private")):
        raw = services.run_cli(["messages", "raw", str(world.message_id(who, subject))], world.env)
        assert raw.returncode == 0
        assert raw.stdout == _raw(subject)


# --- library functions that take a mailbox ------------------------------------------------------


def test_folder_states_and_live_flags_read_only_the_mailbox_asked_for(world: World) -> None:
    alice, bob = world.mailboxes["alice"], world.mailboxes["bob"]
    states = repository.folder_states(world.conn, alice)
    assert set(states) == {"INBOX", SHARED_FOLDER}
    assert {s.mailbox_id for s in states.values()} == {alice}
    flags = repository.live_flags(world.conn, states["INBOX"], 7)
    assert flags == {1: frozenset(), 2: frozenset({"\\Seen"})}
    bob_flags = repository.live_flags(world.conn,
                                      repository.folder_states(world.conn, bob)["INBOX"], 7)
    assert bob_flags == {1: frozenset({"\\Flagged"}), 2: frozenset()}


def test_known_hashes_are_those_of_the_mailbox_asked_for(world: World) -> None:
    same, bobs = hashlib.sha256(SAME).digest(), hashlib.sha256(_raw("b-private")).digest()
    assert store.known_hashes(world.conn, world.mailboxes["alice"], [same, bobs]) == {same}
    assert store.known_hashes(world.conn, world.mailboxes["bob"], [same, bobs]) == {same, bobs}


def test_asking_for_one_mailboxs_sync_queues_that_mailbox_only(own_world: World) -> None:
    published: list[AnyMessage] = []
    [requested] = request_syncs(own_world.conn, published.append, [own_world.mailboxes["bob"]],
                                requested_by="test")
    assert requested.queued
    assert [(m.type, getattr(m, "mailbox_id", None)) for m in published] == [
        ("SyncMailbox", own_world.mailboxes["bob"])]
    active = own_world.conn.execute("SELECT mailbox_id FROM sync_runs WHERE status = 'queued'")
    assert active.fetchall() == [{"mailbox_id": own_world.mailboxes["bob"]}]


# --- notifications ----------------------------------------------------------------------------


def _kinds(world: World, email: str) -> list[int | None]:
    return [n.mailbox_id for n in list_notifications(world.conn, email)]


def test_each_person_is_told_only_about_the_mailboxes_they_may_fix(world: World) -> None:
    m = world.mailboxes
    assert _kinds(world, "alice@example.com") == [m["alice"]]
    assert _kinds(world, "bob@example.com") == [m["bob"]]
    assert _kinds(world, "carol@example.com") == [m["system"]]  # the capability, for the system one
    assert _kinds(world, "dave@example.com") == []  # the capability, but disabled
    assert _kinds(world, "eve@example.com") == []


def test_notifications_list_on_the_command_line_shows_only_that_persons(world: World) -> None:
    result = services.run_cli(["notifications", "list", "--user", "bob@example.com", "--json"],
                              world.env)
    assert result.returncode == 0, result.stderr
    assert [n["mailbox_id"] for n in json.loads(result.stdout)] == [world.mailboxes["bob"]]


def test_popping_one_persons_notifications_leaves_everyone_elses_unread(own_world: World) -> None:
    result = services.run_cli(["notifications", "pop", "--user", "alice@example.com", "--json"],
                              own_world.env)
    assert [n["mailbox_id"] for n in json.loads(result.stdout)] == [own_world.mailboxes["alice"]]
    assert _kinds(own_world, "alice@example.com") == []
    assert _kinds(own_world, "bob@example.com") == [own_world.mailboxes["bob"]]
    assert _kinds(own_world, "carol@example.com") == [own_world.mailboxes["system"]]


def test_an_email_is_matched_whole_ignoring_case_never_as_a_pattern(own_world: World) -> None:
    assert _kinds(own_world, "ALICE@Example.COM") == [own_world.mailboxes["alice"]]
    for pattern in ("%", "%@example.com", "_lice@example.com", "alice@example.com' OR '1'='1"):
        assert list_notifications(own_world.conn, pattern, unread_only=False) == [], pattern
        assert pop_notifications(own_world.conn, pattern) == [], pattern
    assert _kinds(own_world, "bob@example.com") == [own_world.mailboxes["bob"]]


def test_an_event_naming_another_mailboxs_run_touches_neither_run_nor_store(
    own_world: World,
) -> None:
    w = own_world
    conn = w.conn
    alice, bob = w.mailboxes["alice"], w.mailboxes["bob"]
    bob_run = uuid.uuid4()
    conn.execute("INSERT INTO sync_runs (id, mailbox_id, status, requested_by) "
                 "VALUES (%s, %s, 'queued', 'test')", (bob_run, bob))
    token = conn.execute("SELECT lease_token FROM mailboxes WHERE id = %s", (alice,)).fetchone()
    assert token is not None
    forged = MessagesFetched(
        run_id=bob_run, mailbox_id=alice, lease_token=token["lease_token"], folder="INBOX",
        uidvalidity=1, batch_no=0,
        messages=(FetchedMessage(uid=999, internal_date=NOW, size=len(SAME), raw=SAME),))
    stored_before = conn.execute("SELECT count(*) AS n FROM message_folders").fetchone()
    with pytest.raises(PermanentError, match="belongs to mailbox") as refused:
        persist(forged, w.deps)
    event_given_up(forged, refused.value, w.deps)
    run = conn.execute("SELECT status, messages_stored, error FROM sync_runs WHERE id = %s",
                       (bob_run,)).fetchone()
    assert run == {"status": "queued", "messages_stored": 0, "error": None}
    assert conn.execute("SELECT count(*) AS n FROM message_folders").fetchone() == stored_before
