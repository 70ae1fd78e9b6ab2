"""Servers that are not Dovecot's default: a Courier-like namespace (``INBOX.`` prefix, ``.``
separator, no SPECIAL-USE, RFC 2342) and renames that give a folder a new UIDVALIDITY.

A selection names folders as users think of them (``Sent``), which is resolved to the server's
``INBOX.Sent`` and shown; a name that matches nothing is reported, never silently dropped; a
renamed folder is recognised by its content, keeps its selection, and its mail is found again
under the new UIDs without being downloaded a second time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailferry.devkit import faults, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.tcp_proxy import TcpProxy

USER, PASSWORD = "dora", "courier"


@pytest.fixture
def courier(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "courier", courier_namespace=True,
                 capabilities_hidden=["SPECIAL-USE", "CONDSTORE", "QRESYNC"]) as server:
        server.add_user(USER, PASSWORD)
        rng = random.Random(11)
        faults.fill(server, USER, "INBOX", range(40), rng)
        faults.fill(server, USER, "INBOX.Sent", range(40, 55), rng, flags=["\\Seen"])
        faults.fill(server, USER, "INBOX.Projects", range(55, 80), rng)
        yield server


def _sync(env: dict[str, str], mailbox_id: int) -> dict[str, Any]:
    result = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout", "120",
                               "--json"], env, timeout=180)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    run: dict[str, Any] = json.loads(result.stdout)[0]
    return run


def _mailbox(env: dict[str, str], mailbox_id: int) -> dict[str, Any]:
    listed = json.loads(services.run_cli(["mailbox", "list", "--json"], env).stdout)
    row: dict[str, Any] = next(m for m in listed if m["id"] == mailbox_id)
    return row


def _folders(env: dict[str, str], mailbox_id: int) -> dict[str, dict[str, Any]]:
    shown = services.run_cli(["mailbox", "folders", str(mailbox_id), "--json"], env)
    return {f["name"]: f for f in json.loads(shown.stdout)}


def test_a_selection_named_as_users_think_resolves_under_the_personal_namespace_and_says_so(
    courier: Dovecot, env: dict[str, str], database_url: str,
    processes: services.ServiceProcesses,
) -> None:
    mailbox_id = faults.add_mailbox(env, courier.host, courier.port, USER, PASSWORD,
                                    ["INBOX", "Sent", "Archive"])
    processes.start("fetcher")
    processes.start("persister")
    run = _sync(env, mailbox_id)
    assert run["status"] == "done", f"{run}\n{processes.logs()}"
    assert run["folder_notes"] == ["Sent -> INBOX.Sent", "no folder 'Archive' on the server"]
    folders = _folders(env, mailbox_id)
    assert {n for n, f in folders.items() if f["sync_enabled"]} == {"INBOX", "INBOX.Sent"}
    assert run["messages_stored"] == 55
    faults.assert_store_equals_server(courier, USER, database_url, mailbox_id,
                                      ["INBOX", "INBOX.Sent"])
    assert _mailbox(env, mailbox_id)["folder_notes"] == (
        "Sent -> INBOX.Sent; no folder 'Archive' on the server")
    human = services.run_cli(["mailbox", "folders", str(mailbox_id)], env).stdout.decode()
    assert "selection: no folder 'Archive' on the server" in human


def test_a_folder_renamed_with_a_new_uidvalidity_keeps_its_selection_and_mail_without_downloads(
    courier: Dovecot, env: dict[str, str], database_url: str,
    processes: services.ServiceProcesses,
) -> None:
    with TcpProxy(courier.host, courier.port) as proxy:
        mailbox_id = faults.add_mailbox(env, proxy.host, proxy.port, USER, PASSWORD,
                                        ["INBOX", "INBOX.Projects"])
        processes.start("fetcher")
        processes.start("persister")
        assert _sync(env, mailbox_id)["status"] == "done"
        stored_before = faults.sql(database_url, "SELECT id FROM messages ORDER BY id")
        old, new = courier.rename_folder_with_new_uidvalidity(USER, "INBOX.Projects",
                                                              "INBOX.Projects 2026")
        assert old != new
        proxy.take()
        listing = _sync(env, mailbox_id)  # the rename is recognised in this listing
        assert listing["status"] == "done", f"{listing}\n{processes.logs()}"
        resync = _sync(env, mailbox_id)  # and the folder synced under its new name
        traffic = proxy.take()
    assert resync["status"] == "done", f"{resync}\n{processes.logs()}"
    folders = _folders(env, mailbox_id)
    assert folders["INBOX.Projects 2026"]["sync_enabled"]
    assert "INBOX.Projects" not in folders
    bodies = [c.text for c in traffic.commands if "BODY.PEEK[]" in c.text.upper()
              or "BODY[]" in c.text.upper()]
    assert bodies == [], bodies
    assert faults.sql(database_url, "SELECT id FROM messages ORDER BY id") == stored_before
    faults.assert_store_equals_server(courier, USER, database_url, mailbox_id,
                                      ["INBOX", "INBOX.Projects 2026"])
    # the selection names folders: the old name now selects nothing, and says so
    assert _mailbox(env, mailbox_id)["folder_notes"] == (
        "no folder 'INBOX.Projects' on the server")


def test_a_vanished_folder_whose_rename_cannot_be_decided_enables_nothing_and_is_shown(
    courier: Dovecot, env: dict[str, str], database_url: str,
    processes: services.ServiceProcesses,
) -> None:
    mailbox_id = faults.add_mailbox(env, courier.host, courier.port, USER, PASSWORD,
                                    ["INBOX", "INBOX.Projects"])
    processes.start("fetcher")
    processes.start("persister")
    assert _sync(env, mailbox_id)["status"] == "done"
    # Two copies of the folder's mail appear while it vanishes: which one is the rename?
    courier.rename_folder_with_new_uidvalidity(USER, "INBOX.Projects", "INBOX.Copy A")
    with courier.session(USER) as client:
        client.create_folder("INBOX.Copy B")
        client.select_folder("INBOX.Copy A", readonly=True)
        client.copy(client.search(["ALL"]), "INBOX.Copy B")
    run = _sync(env, mailbox_id)
    assert run["status"] == "done", f"{run}\n{processes.logs()}"
    folders = _folders(env, mailbox_id)
    assert not folders["INBOX.Copy A"]["sync_enabled"]
    assert not folders["INBOX.Copy B"]["sync_enabled"]
    assert folders["INBOX.Projects"]["gone_at"] is not None  # kept: it holds synced mail
    assert run["folder_notes"] == ["enabled folder 'INBOX.Projects' vanished from the server"]
