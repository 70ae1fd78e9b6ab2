"""Proves the private Dovecot harness behaves the way the other tests rely on.

Every other integration test, the demo and the benchmarks stand on
``mailferry.devkit.dovecot``; if the harness drifts (a Dovecot upgrade, a config
typo) these tests say so directly instead of through confusing sync failures.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from mailferry.devkit.dovecot import Dovecot

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <hello-1@example.org>\r\n"
    b"\r\n"
    b"Hi Bob!\r\n"
)


def _message(number: int) -> bytes:
    return (
        f"From: a@example.org\nSubject: message {number}\n"
        f"Message-ID: <m{number}@example.org>\n\nbody {number}\n"
    ).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """One plain instance shared by the tests that do not need special options."""
    with Dovecot(tmp_path_factory.mktemp("dovecot")) as instance:
        yield instance


@pytest.fixture
def user(server: Dovecot, request: pytest.FixtureRequest) -> str:
    """A fresh user per test so tests sharing the server cannot see each other's mail."""
    test_name: str = request.node.name
    name = test_name.removeprefix("test_")[:40].replace("[", "-").rstrip("]")
    server.add_user(name, "correct horse")
    return name


def test_a_user_can_log_in_and_append_a_message(server: Dovecot, user: str) -> None:
    uid = server.append(user, "correct horse", "INBOX", MESSAGE, flags=[r"\Seen"])

    assert uid is not None
    with server.session(user) as client:
        client.select_folder("INBOX")
        fetched = client.fetch([uid], ["RFC822", "FLAGS"])
    assert fetched[uid][b"RFC822"] == MESSAGE
    assert b"\\Seen" in fetched[uid][b"FLAGS"]


def test_a_wrong_password_is_rejected_with_a_login_error(server: Dovecot, user: str) -> None:
    with pytest.raises(LoginError):
        server.client(user, "wrong password")


def test_changing_the_password_makes_the_old_one_fail_at_once(server: Dovecot, user: str) -> None:
    server.client(user, "correct horse").logout()

    server.set_password(user, "battery staple")

    with pytest.raises(LoginError):
        server.client(user, "correct horse")
    server.client(user, "battery staple").logout()


def test_a_removed_user_can_no_longer_log_in(server: Dovecot, user: str) -> None:
    server.client(user).logout()

    server.remove_user(user)

    with pytest.raises(LoginError):
        server.client(user, "correct horse")


def test_passwords_may_contain_punctuation_and_spaces(server: Dovecot) -> None:
    password = 'p:a ss"w%rd\\{PLAIN}#'
    server.add_user("punctuation", password)

    server.client("punctuation", password).logout()


def test_a_folder_with_a_non_ascii_name_can_be_created_and_listed(
    server: Dovecot, user: str
) -> None:
    with server.session(user) as client:
        client.create_folder("Données/Été")

        names = [name for _flags, _delimiter, name in client.list_folders()]
        delimiters = {delimiter for _flags, delimiter, _name in client.list_folders()}

    assert "Données/Été" in names
    assert "Données" in names
    assert delimiters == {b"/"}
    assert server.maildir_path(user, "Données/Été").is_dir()


def test_special_folders_are_not_created_automatically(server: Dovecot, user: str) -> None:
    with server.session(user) as client:
        names = [name for _flags, _delimiter, name in client.list_folders()]

    assert names == ["INBOX"]


def test_a_created_sent_folder_carries_the_sent_special_use_flag(
    server: Dovecot, user: str
) -> None:
    with server.session(user) as client:
        client.create_folder("Sent")
        client.create_folder("Trash")
        flags = {name: set(flags) for flags, _delimiter, name in client.list_folders()}

    assert b"\\Sent" in flags["Sent"]
    assert b"\\Trash" in flags["Trash"]
    assert not {b"\\Sent", b"\\Trash"} & flags["INBOX"]


def test_a_default_instance_announces_condstore_and_qresync(server: Dovecot, user: str) -> None:
    with server.session(user) as client:
        capabilities = set(client.capabilities())

    assert {b"CONDSTORE", b"QRESYNC"} <= capabilities


def test_hidden_capabilities_are_not_announced(tmp_path: Path) -> None:
    with Dovecot(tmp_path, capabilities_hidden=["CONDSTORE", "QRESYNC"]) as hidden:
        hidden.add_user("alice", "secret")
        with hidden.session("alice") as client:
            capabilities = set(client.capabilities())
            greeting = client.welcome

    assert not {b"CONDSTORE", b"QRESYNC"} & capabilities
    assert {b"IMAP4REV1", b"IDLE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE"} <= capabilities
    assert b"CONDSTORE" not in greeting


def test_hidden_condstore_is_still_honoured_if_a_client_insists(tmp_path: Path) -> None:
    """Documents a Dovecot 2.3 limit: hiding only stops the announcement.

    The sync client must therefore decide from CAPABILITY alone and never
    probe with ENABLE; a server that truly lacks CONDSTORE would reject it.
    """
    with Dovecot(tmp_path, capabilities_hidden=["CONDSTORE", "QRESYNC"]) as hidden:
        hidden.add_user("alice", "secret")
        with hidden.session("alice") as client:
            enabled = client.enable("CONDSTORE")

    assert enabled == [b"CONDSTORE"]


def test_implicit_tls_login_verifies_against_the_ca_file(tmp_path: Path) -> None:
    with Dovecot(tmp_path, ssl=True) as secure:
        secure.add_user("alice", "secret")
        assert secure.ssl_port is not None and secure.ca_file is not None

        context = ssl.create_default_context(cafile=str(secure.ca_file))
        client = IMAPClient(secure.host, secure.ssl_port, ssl=True, ssl_context=context)
        client.login("alice", "secret")
        cipher = client.socket().cipher()
        client.logout()

        untrusting = ssl.create_default_context()  # system CAs only
        with pytest.raises(ssl.SSLCertVerificationError):
            IMAPClient(secure.host, secure.ssl_port, ssl=True, ssl_context=untrusting)

    assert cipher is not None


def test_starttls_upgrades_the_plain_port(tmp_path: Path) -> None:
    with Dovecot(tmp_path, ssl=True) as secure:
        secure.add_user("alice", "secret")
        client = IMAPClient(secure.host, secure.port, ssl=False)
        assert b"STARTTLS" in client.capabilities()

        client.starttls(secure.ssl_context())
        client.login("alice", "secret")
        is_tls = isinstance(client.socket(), ssl.SSLSocket)
        client.logout()

    assert is_tls


def test_a_plain_instance_offers_no_tls(server: Dovecot) -> None:
    client = IMAPClient(server.host, server.port, ssl=False)
    try:
        capabilities = client.capabilities()
    finally:
        client.shutdown()

    assert server.ssl_port is None
    assert b"STARTTLS" not in capabilities


def test_filled_maildir_messages_have_their_internaldate_and_flags(
    server: Dovecot, user: str
) -> None:
    base = datetime(2024, 3, 1, 12, 30, 15, tzinfo=UTC)
    paris = timezone(timedelta(hours=1))
    messages = [
        (_message(0), base, [r"\Seen"]),
        (_message(1), base + timedelta(days=1), [r"\Seen", r"\Flagged", "$Forwarded"]),
        (_message(2), datetime(2023, 12, 24, 18, 0, tzinfo=paris), []),
        (_message(3), base, [r"\Answered", r"\Draft", "Work"]),
    ]

    written = server.fill_maildir(user, "Archive/2024", messages)

    assert written == 4
    with server.session(user) as client:
        client.normalise_times = False  # keep the server's UTC offset
        client.select_folder("Archive/2024", readonly=True)
        fetched = client.fetch(
            client.search(), ["INTERNALDATE", "FLAGS", "RFC822.SIZE", "BODY.PEEK[]"]
        )
    by_body = {data[b"BODY[]"]: data for data in fetched.values()}
    assert len(by_body) == 4
    for raw, when, flags in messages:
        data = by_body[raw.replace(b"\n", b"\r\n")]
        assert data[b"INTERNALDATE"] == when
        # \Recent is session state: Dovecot sets it on mail new to it.
        assert {flag.decode() for flag in data[b"FLAGS"]} - {"\\Recent"} == set(flags)
        assert data[b"RFC822.SIZE"] == len(raw.replace(b"\n", b"\r\n"))


def test_filled_messages_show_up_in_an_open_session(server: Dovecot, user: str) -> None:
    with server.session(user) as client:
        client.select_folder("INBOX")
        now = datetime.now(UTC).replace(microsecond=0)

        server.fill_maildir(user, "INBOX", ((_message(n), now, ()) for n in range(50)))
        client.noop()
        status = client.folder_status("INBOX", ["MESSAGES"])

    assert status[b"MESSAGES"] == 50


def test_two_instances_run_at_the_same_time(tmp_path: Path) -> None:
    with Dovecot(tmp_path / "one") as one, Dovecot(tmp_path / "two") as two:
        one.add_user("alice", "first")
        two.add_user("alice", "second")
        one.append("alice", None, "INBOX", MESSAGE)

        with one.session("alice") as first, two.session("alice") as second:
            in_first = first.select_folder("INBOX")[b"EXISTS"]
            in_second = second.select_folder("INBOX")[b"EXISTS"]
        with pytest.raises(LoginError):
            two.client("alice", "first")

    assert one.port != two.port
    assert (in_first, in_second) == (1, 0)


def test_a_restart_keeps_the_port_users_and_mail(tmp_path: Path) -> None:
    with Dovecot(tmp_path) as instance:
        instance.add_user("alice", "secret")
        instance.append("alice", None, "INBOX", MESSAGE)
        port = instance.port

        instance.restart()

        assert instance.port == port
        with instance.session("alice") as client:
            assert client.select_folder("INBOX")[b"EXISTS"] == 1


def test_stop_leaves_no_dovecot_process_behind(tmp_path: Path) -> None:
    instance = Dovecot(tmp_path)
    instance.start()
    pid = instance.pid
    assert pid is not None

    instance.stop()

    assert not instance.running
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_maildir_can_be_filled_before_the_server_starts(tmp_path: Path) -> None:
    instance = Dovecot(tmp_path)
    instance.add_user("alice", "secret")
    when = datetime(2022, 5, 17, 8, 0, tzinfo=UTC)

    instance.fill_maildir("alice", "Archive/2022", [(_message(7), when, [r"\Seen"])])

    with instance, instance.session("alice") as client:
        client.normalise_times = False
        client.select_folder("Archive/2022", readonly=True)
        fetched = client.fetch(client.search(), ["INTERNALDATE", "FLAGS"])
    assert [data[b"INTERNALDATE"] for data in fetched.values()] == [when]


# -- a Courier-like server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def courier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """Folders under ``INBOX.`` with ``.`` as separator, no SPECIAL-USE: what Courier shows."""
    with Dovecot(tmp_path_factory.mktemp("courier"), courier_namespace=True) as instance:
        yield instance


@pytest.fixture
def courier_user(courier: Dovecot, request: pytest.FixtureRequest) -> str:
    name: str = request.node.name.removeprefix("test_")[:40]
    courier.add_user(name, "correct horse")
    return name


def test_a_courier_namespace_lists_folders_under_inbox_with_a_dot_delimiter(
    courier: Dovecot, courier_user: str
) -> None:
    with courier.session(courier_user) as client:
        client.create_folder("INBOX.Sent")
        client.create_folder("INBOX.Archive.2024")
        listed = {name: (set(flags), delimiter) for flags, delimiter, name in client.list_folders()}

    assert {"INBOX", "INBOX.Sent", "INBOX.Archive", "INBOX.Archive.2024"} <= set(listed)
    assert {delimiter for _, delimiter in listed.values()} == {b"."}
    special_use = {b"\\Sent", b"\\Trash", b"\\Drafts", b"\\Junk", b"\\Archive", b"\\All"}
    assert not any(flags & special_use for flags, _ in listed.values()), listed
    assert courier.maildir_path(courier_user, "INBOX.Archive.2024").is_dir()


def test_a_courier_namespace_answers_namespace_with_the_inbox_prefix(
    courier: Dovecot, courier_user: str
) -> None:
    with courier.session(courier_user) as client:
        namespaces = client.namespace()

    assert namespaces.personal == (("INBOX.", "."),)
    assert (namespaces.other, namespaces.shared) == (None, None)


def test_a_courier_folder_filled_on_disk_shows_under_its_prefixed_name(
    courier: Dovecot, courier_user: str
) -> None:
    when = datetime(2023, 1, 2, 3, 4, tzinfo=UTC)

    courier.fill_maildir(courier_user, "Sent", [(_message(1), when, [r"\Seen"])])

    with courier.session(courier_user) as client:
        assert client.select_folder("INBOX.Sent", readonly=True)[b"EXISTS"] == 1


def _contents(client: IMAPClient, folder: str) -> list[tuple[bytes, frozenset[bytes], datetime]]:
    client.select_folder(folder, readonly=True)
    fetched = client.fetch(client.search(["ALL"]), ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])
    return sorted((data[b"BODY[]"], frozenset(data[b"FLAGS"]), data[b"INTERNALDATE"])
                  for data in fetched.values())


def test_a_courier_rename_gives_a_new_uidvalidity_with_the_same_messages_and_flags(
    courier: Dovecot, courier_user: str
) -> None:
    when = datetime(2022, 5, 17, 8, 0, tzinfo=UTC)
    with courier.session(courier_user) as client:
        client.normalise_times = False
        client.create_folder("INBOX.Work")
        client.create_folder("INBOX.Work.Old")
        for number, flags in ((1, [b"\\Seen"]), (2, [b"\\Flagged", b"$Label1"]), (3, [])):
            client.append("INBOX.Work", _message(number), flags=flags, msg_time=when)
        client.append("INBOX.Work.Old", _message(4), flags=[b"\\Answered"], msg_time=when)
        before = _contents(client, "INBOX.Work"), _contents(client, "INBOX.Work.Old")
        client.close_folder()

    old, new = courier.rename_folder_with_new_uidvalidity(courier_user, "INBOX.Work",
                                                          "INBOX.Projects")

    with courier.session(courier_user) as client:
        client.normalise_times = False
        names = {name for _, _, name in client.list_folders()}
        after = _contents(client, "INBOX.Projects"), _contents(client, "INBOX.Projects.Old")
        status = client.folder_status("INBOX.Projects", [b"UIDVALIDITY"])
    assert new != old and status[b"UIDVALIDITY"] == new
    assert not {"INBOX.Work", "INBOX.Work.Old"} & names
    assert after == before
    assert [len(folder) for folder in after] == [3, 1]


def test_a_courier_rename_works_in_the_default_namespace_too(server: Dovecot, user: str) -> None:
    server.append(user, None, "INBOX", _message(5))
    with server.session(user) as client:
        client.create_folder("Projects")
        client.select_folder("INBOX")
        client.copy(client.search(["ALL"]), "Projects")

    old, new = server.rename_folder_with_new_uidvalidity(user, "Projects", "Done/Projects")

    with server.session(user) as client:
        info = client.select_folder("Done/Projects", readonly=True)
        assert not client.folder_exists("Projects")
    assert (info[b"UIDVALIDITY"], info[b"EXISTS"]) == (new, 1) and new != old
