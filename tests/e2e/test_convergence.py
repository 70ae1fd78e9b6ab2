"""After every sync the enabled folders in PostgreSQL equal the server's: the same messages and
the same flags, whatever the server did in between. Proven with CONDSTORE and without it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot

FOLDERS = ("INBOX", "Work")
State = dict[tuple[str, int], tuple[str, tuple[str, ...]]]


@pytest.fixture(params=[(), ("CONDSTORE", "QRESYNC")], ids=["condstore", "no-condstore"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot", capabilities_hidden=request.param) as dovecot:
        dovecot.add_user("carol", "pw")
        yield dovecot


def _message(n: int) -> bytes:
    return f"Subject: message {n}\r\nMessage-ID: <{n}@test>\r\n\r\nbody {n}\r\n".encode()


def server_state(imap: IMAPClient) -> State:
    state: State = {}
    for folder in FOLDERS:
        imap.select_folder(folder, readonly=True)
        for uid, data in imap.fetch(imap.search("ALL"), ["BODY.PEEK[]", "FLAGS"]).items():
            flags = tuple(sorted(f.decode() for f in data[b"FLAGS"] if f != b"\\Recent"))
            state[(folder, uid)] = (hashlib.sha256(data[b"BODY[]"]).hexdigest(), flags)
    return state


def stored_state(env: dict[str, str], mailbox_id: int) -> State:
    result = services.run_cli(["messages", "list", "--mailbox", str(mailbox_id), "--json"], env)
    assert result.returncode == 0, result.stderr
    return {(m["folder"], m["uid"]): (m["sha256"], tuple(sorted(m["flags"])))
            for m in json.loads(result.stdout)}


def _sync(env: dict[str, str], mailbox_id: int) -> dict[str, Any]:
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "60",
                               "--json"], env)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    run: dict[str, Any] = json.loads(result.stdout)[0]
    return run


def test_the_store_follows_flags_expunges_moves_and_a_uidvalidity_reset(
    env: dict[str, str], server: Dovecot, conn: db.Connection,
    processes: services.ServiceProcesses,
) -> None:
    with server.session("carol") as imap:
        imap.create_folder("Work")
        for n in range(10):
            imap.append("INBOX", _message(n))
        for n in range(10, 15):
            imap.append("Work", _message(n), flags=[b"\\Seen"])
    assert services.run_cli(["user", "add", "--email", "carol@example.com"], env).returncode == 0
    added = services.run_cli(
        ["mailbox", "add", "--owner", "carol@example.com", "--host", server.host, "--port",
         str(server.port), "--security", "none", "--username", "carol", "--password-stdin",
         "--folders", ",".join(FOLDERS)], env, stdin=b"pw\n")
    mailbox_id = int(json.loads(added.stdout)["id"])
    processes.start("fetcher")
    processes.start("persister")

    _sync(env, mailbox_id)
    with server.session("carol") as imap:
        assert stored_state(env, mailbox_id) == server_state(imap)

        imap.select_folder("INBOX")
        imap.add_flags([1, 2, 3], [b"\\Seen"])
        imap.add_flags([4], [b"\\Flagged", b"$Label1"])
        imap.select_folder("Work")
        imap.remove_flags([2], [b"\\Seen"])
        imap.add_flags([3], [b"\\Answered"])
        imap.select_folder("INBOX")
        imap.delete_messages([5, 6])
        imap.expunge()
        imap.move([7], "Work")
        imap.append("INBOX", _message(100))
        imap.append("Work", _message(101), flags=[b"\\Draft"])
    _sync(env, mailbox_id)
    with server.session("carol") as imap:
        assert stored_state(env, mailbox_id) == server_state(imap)

    raw_before = conn.execute("SELECT count(*) AS n FROM raw_messages").fetchone()
    with server.session("carol") as imap:  # a UIDVALIDITY reset: the folder is made anew
        imap.select_folder("Work", readonly=True)
        kept = [d[b"BODY[]"] for d in imap.fetch(imap.search("ALL"), ["BODY.PEEK[]"]).values()]
        imap.close_folder()
        imap.delete_folder("Work")
        imap.create_folder("Work")
        for raw in kept:
            imap.append("Work", raw)
    _sync(env, mailbox_id)
    with server.session("carol") as imap:
        assert stored_state(env, mailbox_id) == server_state(imap)
    assert conn.execute("SELECT count(*) AS n FROM raw_messages").fetchone() == raw_before

    unchanged = _sync(env, mailbox_id)
    assert unchanged["messages_stored"] == 0
    with server.session("carol") as imap:
        assert stored_state(env, mailbox_id) == server_state(imap)


def test_a_renamed_folder_keeps_its_settings_and_mail_and_is_synced_under_its_new_name_at_once(
    env: dict[str, str], server: Dovecot, conn: db.Connection,
    processes: services.ServiceProcesses,
) -> None:
    with server.session("carol") as imap:
        imap.create_folder("Work")
        imap.create_folder("Empty")
        for n in range(3):
            imap.append("Work", _message(n))
    assert services.run_cli(["user", "add", "--email", "carol@example.com"], env).returncode == 0
    added = services.run_cli(
        ["mailbox", "add", "--owner", "carol@example.com", "--host", server.host, "--port",
         str(server.port), "--security", "none", "--username", "carol", "--password-stdin",
         "--folders", "INBOX,Work"], env, stdin=b"pw\n")
    mailbox_id = int(json.loads(added.stdout)["id"])
    processes.start("fetcher")
    processes.start("persister")
    _sync(env, mailbox_id)
    raw_before = conn.execute("SELECT count(*) AS n FROM raw_messages").fetchone()

    with server.session("carol") as imap:
        imap.rename_folder("Work", "Projets/Travail")
        imap.delete_folder("Empty")
        imap.append("Projets/Travail", _message(3))
    renaming = _sync(env, mailbox_id)  # recognises the rename and syncs the folder at once
    assert renaming["messages_stored"] == 1, "only the new message travels"

    listed = services.run_cli(["mailbox", "folders", str(mailbox_id), "--json"], env)
    folders = {f["name"]: f for f in json.loads(listed.stdout)}
    assert "Work" not in folders and "Empty" not in folders
    assert folders["Projets/Travail"]["sync_enabled"] is True
    assert folders["Projets/Travail"]["messages"] == 4
    stored = stored_state(env, mailbox_id)
    assert sorted(folder for folder, _ in stored) == ["Projets/Travail"] * 4
    raw_after = conn.execute("SELECT count(*) AS n FROM raw_messages").fetchone()
    assert raw_after == {"n": raw_before["n"] + 1}  # type: ignore[index]
    assert _sync(env, mailbox_id)["messages_stored"] == 0, "nothing left for the next run"
