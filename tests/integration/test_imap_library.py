"""The library API (connector, email manager, folder manager, search builder) against a real Dovecot.

The mailbox is seeded so every search has one known answer; hostile values must come back with
exactly that answer and leave the session healthy (a value that split the command would have run
``A001 LOGOUT`` or broken the next command).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.errors import ImapAuthError, ImapConnectionError, ImapProtocolError, NotFound
from mailferry.imap import (
    ImapConfig,
    ImapConnector,
    ImapEmailFolderManager,
    ImapEmailManager,
    SearchQuery,
    SearchQueryBuilder,
    connector_factory,
)

USER, PASSWORD = "alice", "secret"


def _at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, 0, tzinfo=UTC)


# UID -> (raw message, internal date, flags); appended in this order, so UIDs are 1..6.
MESSAGES: dict[int, tuple[bytes, datetime, list[str]]] = {
    1: (b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\n"
        b"Cc: carol@example.org\r\nSubject: Invoice 2024\r\nDate: Wed, 10 Jan 2024 09:00:00 +0100\r\n"
        b"Message-ID: <one@example.org>\r\n\r\nPlease pay the invoice.\r\n",
        _at(date(2024, 1, 10)), [r"\Seen"]),
    2: (b"From: bob@example.org\r\nTo: alice@example.org\r\nBcc: dave@example.org\r\n"
        b"Subject: Meeting notification\r\n\r\nSee you at noon.\r\n",
        _at(date(2024, 2, 15)), [r"\Flagged"]),
    3: (("From: Carol <carol@example.org>\r\nTo: alice@example.org\r\n"
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=\r\nX-Mailer: mutt\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Schöne Grüße aus 日本.\r\n").encode(),
        _at(date(2024, 3, 20)), [r"\Answered", r"\Seen"]),
    4: (b"From: dave@example.org\r\nTo: alice@example.org\r\nSubject: Big report\r\n\r\n"
        + b"x" * 60 + b"\r\n" + (b"y" * 78 + b"\r\n") * 80,
        _at(date(2024, 3, 20)), ["Work"]),
    5: (b"From: eve@example.org\r\nTo: alice@example.org\r\n"
        b'Subject: odd "quote" back\\slash (paren) {5} brace\r\n\r\n'
        b"line one\r\nA001 LOGOUT\r\n",
        _at(date(2024, 4, 1)), []),
    6: (b"From: frank@example.org\r\nTo: alice@example.org\r\nSubject: Deleted one\r\n\r\nbye\r\n",
        _at(date(2024, 4, 2)), [r"\Deleted", r"\Draft"]),
}
ALL = sorted(MESSAGES)


def _size(raw: bytes) -> int:
    return len(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    with Dovecot(tmp_path_factory.mktemp("dovecot")) as dovecot:
        dovecot.add_user(USER, PASSWORD)
        for uid, (raw, when, flags) in MESSAGES.items():
            assert dovecot.append(USER, None, "INBOX", raw, flags=flags, when=when) == uid
        with dovecot.session(USER) as client:
            for folder in ("Données/Été", "Données/Hiver", "Sent", "Drafts", "Trash", "Junk",
                           "Archive", "Projets/2024/Q1"):
                client.create_folder(folder)
            client.append("Données/Été", b"Subject: summer\r\n\r\nsun\r\n")
        yield dovecot


def _config(server: Dovecot, password: str = PASSWORD, user: str = USER) -> ImapConfig:
    return ImapConfig(server.host, server.port, "none", user, password, timeout=10,
                      allow_private_networks=True)


@pytest.fixture
def connector(server: Dovecot) -> Iterator[ImapConnector]:
    with connector_factory.create_imap_connector(_config(server)) as opened:
        yield opened


@pytest.fixture
def inbox(connector: ImapConnector) -> ImapEmailManager:
    manager = ImapEmailManager(connector)
    manager.select_folder("INBOX")
    return manager


b = SearchQueryBuilder()


# --- each operator --------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "expected"), [
    (b, ALL),
    (b.from_("alice@example.org"), [1]),
    (b.from_("Carol"), [3]),
    (b.to("bob@example.org"), [1]),
    (b.to("alice"), [2, 3, 4, 5, 6]),
    (b.cc("carol@"), [1]),
    (b.bcc("dave@example.org"), [2]),
    (b.subject("notification"), [2]),
    (b.subject("INVOICE"), [1]),  # substring, case-insensitive (RFC 3501 6.4.4)
    (b.body("pay the invoice"), [1]),
    (b.body("Invoice 2024"), []),  # only in a header
    (b.text("Invoice"), [1]),
    (b.since(date(2024, 3, 20)), [3, 4, 5, 6]),
    (b.before(date(2024, 3, 20)), [1, 2]),
    (b.on(date(2024, 3, 20)), [3, 4]),
    (b.sent_on(date(2024, 1, 10)), [1]),
    (b.seen(), [1, 3]),
    (b.unseen(), [2, 4, 5, 6]),
    (b.flagged(), [2]),
    (b.unflagged(), [1, 3, 4, 5, 6]),
    (b.answered(), [3]),
    (b.unanswered(), [1, 2, 4, 5, 6]),
    (b.deleted(), [6]),
    (b.undeleted(), [1, 2, 3, 4, 5]),
    (b.draft(), [6]),
    (b.undraft(), [1, 2, 3, 4, 5]),
    (b.keyword("Work"), [4]),
    (b.unkeyword("Work"), [1, 2, 3, 5, 6]),
    (b.larger(2000), [4]),
    (b.smaller(2000), [1, 2, 3, 5, 6]),
    (b.uid("2:3"), [2, 3]),
    (b.uid("5:*"), [5, 6]),
    (b.uid("100:*"), []),  # "*" would match UID 6 (RFC 3501 6.4.8): dropped
    (b.uid(range(1, 3)), [1, 2]),
    (b.uid([1, 4, 6]), [1, 4, 6]),
    (b.uid(3), [3]),
    (b.header("X-Mailer", "mutt"), [3]),
    (b.header("x-mailer", ""), [3]),
    (b.header("Message-ID", "<one@"), [1]),
])
def test_each_search_operator_finds_exactly_the_seeded_messages(
    inbox: ImapEmailManager, query: SearchQueryBuilder, expected: list[int]
) -> None:
    assert inbox.search_uids(query.get()) == expected


@pytest.mark.parametrize(("query", "expected"), [
    (b.to("alice").seen(), [3]),
    (b.or_(b.from_("alice@"), b.from_("bob@")), [1, 2]),
    (b.or_(b.flagged(), b.answered(), b.keyword("Work")), [2, 3, 4]),
    (b.not_(b.seen()), [2, 4, 5, 6]),
    (b.not_(b.seen().to("alice")), [1, 2, 4, 5, 6]),  # NOT (SEEN TO alice)
    (b.or_(b.subject("invoice").seen(), b.not_(b.undeleted())), [1, 6]),
    (b.on(date(2024, 3, 20)).not_(b.or_(b.larger(2000), b.answered())), []),
    (b.since(date(2024, 2, 1)).before(date(2024, 4, 1)).unseen(), [2, 4]),
])
def test_not_and_or_combine_as_boolean_logic(
    inbox: ImapEmailManager, query: SearchQueryBuilder, expected: list[int]
) -> None:
    assert inbox.search_uids(query.get()) == expected


# --- hostile values ------------------------------------------------------------------------------


def _session_is_healthy(manager: ImapEmailManager, server: Dovecot) -> None:
    client = manager.connector.client
    client.noop()
    assert manager.search_uids(b.get()) == ALL
    log = server.log_file.read_text(errors="replace")
    assert "Logged out" not in log.split("hostile-marker")[-1]


@pytest.mark.parametrize(("value", "expected"), [
    ('"quote"', [5]),
    ("back\\slash", [5]),
    ("(paren)", [5]),
    (")", [5]),
    ("{5}", [5]),
    ("{5}\r\n", []),
    ("x\r\nA001 LOGOUT", []),
    ('") LOGOUT\r\nA001 LOGOUT\r\n', []),
    ("\r\n", ALL),  # Dovecot folds whitespace: an all-blank key matches every message
    ('"', [5]),
    ("\\", [5]),
])
def test_hostile_subject_values_match_literally_and_never_split_the_command(
    inbox: ImapEmailManager, server: Dovecot, value: str, expected: list[int]
) -> None:
    _mark(server)
    assert inbox.search_uids(b.subject(value).get()) == expected
    assert inbox.search_uids(b.or_(b.subject(value), b.uid(1)).get()) == sorted({1, *expected})
    _session_is_healthy(inbox, server)


def test_a_line_break_inside_a_value_reaches_the_server_as_data(
    inbox: ImapEmailManager, server: Dovecot
) -> None:
    # Dovecot matches body lines joined by a bare LF: the literal got through intact.
    _mark(server)
    assert inbox.search_uids(b.body("line one\nA001 LOGOUT").get()) == [5]
    assert inbox.search_uids(b.not_(b.body("one\nA001")).get()) == [1, 2, 3, 4, 6]
    _session_is_healthy(inbox, server)


def test_a_nul_in_a_value_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="NUL"):
        b.subject("a\0b")


def _mark(server: Dovecot) -> None:
    """A position in the Dovecot log: Logged-out lines after it belong to this test."""
    with server.log_file.open("a") as log:
        log.write("hostile-marker\n")


# --- non-ASCII -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "expected"), [
    (b.subject("Grüße"), [3]),
    (b.subject("Köln"), [3]),
    (b.body("日本"), [3]),
    (b.text("Schöne"), [3]),
    (b.or_(b.subject("Grüße"), b.subject("invoice")), [1, 3]),
    (b.not_(b.body("日本").seen()), [1, 2, 4, 5, 6]),
    (b.from_("Ünknown"), []),
])
def test_non_ascii_values_are_searched_with_charset_utf8(
    inbox: ImapEmailManager, query: SearchQueryBuilder, expected: list[int]
) -> None:
    assert query.get().encode()[0] == "UTF-8"
    assert inbox.search_uids(query.get()) == expected


def test_without_literal_plus_literals_wait_for_the_servers_continuation(tmp_path: Path) -> None:
    with Dovecot(tmp_path, capabilities_hidden=["LITERAL+"]) as plain:
        plain.add_user(USER, PASSWORD)
        raw, when, flags = MESSAGES[3]
        plain.append(USER, None, "INBOX", raw, flags=flags, when=when)
        with connector_factory.create_imap_connector(_config(plain)) as connector:
            assert not connector.has_capability("LITERAL+")
            manager = ImapEmailManager(connector)
            manager.select_folder("INBOX")
            assert manager.search_uids(b.subject("Grüße").body("日本").get()) == [1]
            assert manager.search_uids(b.subject("x\r\nA001 LOGOUT").get()) == []
            assert manager.search_uids(b.get()) == [1]


def test_a_charset_the_server_refuses_is_a_clear_protocol_error(
    inbox: ImapEmailManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    query = b.subject("Grüße").get()
    _, pieces = query.encode()
    monkeypatch.setattr(SearchQuery, "encode", lambda self: ("X-NO-SUCH-CHARSET", pieces))
    with pytest.raises(ImapProtocolError, match=r"cannot search in X-NO-SUCH-CHARSET.*BADCHARSET"):
        inbox.search_uids(query)
    monkeypatch.undo()
    assert inbox.search_uids(query) == [3]  # the session goes on


# --- reading messages ----------------------------------------------------------------------------


def test_find_items_returns_decoded_headers_flags_dates_and_sizes(inbox: ImapEmailManager) -> None:
    emails = {e.uid: e for e in inbox.find_items(b.uid("1:3").get())}

    assert sorted(emails) == [1, 2, 3]
    one, two, three = emails[1], emails[2], emails[3]
    assert one.subject == "Invoice 2024"
    assert one.from_ == "Alice <alice@example.org>"
    assert one.to == ("Bob <bob@example.org>",)
    assert one.cc == ("carol@example.org",)
    assert one.message_id == "one@example.org"  # as the store keeps it, without <>
    assert one.date == datetime(2024, 1, 10, 8, 0, tzinfo=UTC)
    assert one.flags == ("\\Seen",)
    assert one.internal_date == _at(date(2024, 1, 10))
    assert one.size == _size(MESSAGES[1][0])
    assert two.bcc == ("dave@example.org",)
    assert two.flags == ("\\Flagged",)
    assert three.subject == "Grüße aus Köln"
    assert set(three.flags) == {"\\Answered", "\\Seen"}


def test_fetch_returns_the_exact_appended_bytes_without_marking_them_read(
    connector: ImapConnector,
) -> None:
    manager = ImapEmailManager(connector)
    manager.select_folder("INBOX", readonly=False)  # even read-write: BODY.PEEK[]

    assert manager.fetch(2) == MESSAGES[2][0]
    assert manager.fetch([4, 5, 999]) == {4: MESSAGES[4][0], 5: MESSAGES[5][0]}
    assert manager.fetch_parsed(3).text_body == "Schöne Grüße aus 日本.\r\n"
    assert manager.search_uids(b.unseen().get()) == [2, 4, 5, 6]
    with pytest.raises(NotFound, match="no message with UID 999"):
        manager.fetch(999)


def test_no_mail_or_password_reaches_the_log_even_at_debug_level(
    server: Dovecot, caplog: pytest.LogCaptureFixture,
) -> None:
    """imapclient turns imaplib's protocol trace on; a trace would hold every mail (and cost
    the fetcher 40% of its CPU formatting it, issue 11)."""
    caplog.set_level(logging.DEBUG)
    with connector_factory.create_imap_connector(_config(server)) as connector:
        manager = ImapEmailManager(connector)
        manager.select_folder("INBOX")
        assert manager.fetch(1) == MESSAGES[1][0]
    assert "Please pay the invoice" not in caplog.text
    assert PASSWORD not in caplog.text


# --- folders -------------------------------------------------------------------------------------


def test_non_ascii_folders_are_selected_by_display_or_raw_name(connector: ImapConnector) -> None:
    manager = ImapEmailManager(connector)

    by_display = manager.select_folder("Données/Été")
    assert manager.selected_folder == "Donn&AOk-es/&AMk-t&AOk-"
    by_raw = manager.select_folder("Donn&AOk-es/&AMk-t&AOk-")

    assert by_display.exists == by_raw.exists == 1
    assert by_display.uidvalidity == by_raw.uidvalidity
    assert manager.search_uids(b.subject("summer").get()) == [1]


def test_selecting_a_missing_folder_is_a_protocol_error_naming_it(connector: ImapConnector) -> None:
    with pytest.raises(ImapProtocolError, match=r"127\.0\.0\.1:\d+ Nope: "):
        ImapEmailManager(connector).select_folder("Nope")


def test_searching_before_selecting_a_folder_says_so(connector: ImapConnector) -> None:
    with pytest.raises(ImapProtocolError, match="no folder selected"):
        ImapEmailManager(connector).search_uids(b.get())


def test_get_folders_returns_the_whole_tree_with_types_from_special_use(
    connector: ImapConnector,
) -> None:
    tree = ImapEmailFolderManager(connector).get_folders(None, recursive=True)

    assert [f.name for f in tree] == ["INBOX", "Archive", "Données", "Drafts", "Junk", "Projets",
                                      "Sent", "Trash"]
    by_path = {f.path: f for root in tree for f in root.walk()}
    assert {p: f.type for p, f in by_path.items() if f.type != "other"} == {
        "INBOX": "inbox", "Sent": "sent", "Drafts": "drafts", "Trash": "trash", "Junk": "spam",
        "Archive": "archive",
    }
    assert "\\Sent" in by_path["Sent"].flags
    donnees = by_path["Données"]
    assert [c.name for c in donnees.children] == ["Été", "Hiver"]
    ete = donnees.children[0]
    assert (ete.path, ete.raw_name, ete.delimiter) == ("Données/Été", "Donn&AOk-es/&AMk-t&AOk-", "/")
    assert ete.selectable and ete.children == ()
    assert [f.path for f in by_path["Projets"].walk()] == ["Projets", "Projets/2024",
                                                           "Projets/2024/Q1"]


def test_get_folders_of_a_parent_gives_its_children_recursively_or_not(
    connector: ImapConnector,
) -> None:
    folders = ImapEmailFolderManager(connector)

    assert [f.path for f in folders.get_folders("Données", recursive=False)] == [
        "Données/Été", "Données/Hiver"]
    assert [f.path for f in folders.get_folders("Donn&AOk-es", recursive=True)] == [
        "Données/Été", "Données/Hiver"]
    [year] = folders.get_folders("Projets", recursive=False)
    assert (year.path, year.children) == ("Projets/2024", ())
    [year] = folders.get_folders("Projets", recursive=True)
    assert [c.path for c in year.children] == ["Projets/2024/Q1"]
    top = folders.get_folders(None, recursive=False)
    assert all(f.children == () for f in top) and len(top) == 8
    assert folders.get_folders("Données/Été") == []
    with pytest.raises(NotFound, match="no folder 'Nowhere'"):
        folders.get_folders("Nowhere")


# --- connecting ----------------------------------------------------------------------------------


def test_a_wrong_password_is_an_authentication_error(server: Dovecot) -> None:
    connector = connector_factory.create_imap_connector(_config(server, password="wrong"))
    with pytest.raises(ImapAuthError, match="login refused for user 'alice'"), connector:
        ImapEmailManager(connector).select_folder("INBOX")
    assert not connector.connected


def test_a_closed_port_is_a_connection_error(server: Dovecot) -> None:
    config = _config(server).model_copy(update={"port": 1})
    with pytest.raises(ImapConnectionError, match="connection refused"):
        connector_factory.create_imap_connector(config).connect()


def test_the_connector_connects_at_first_use_and_again_after_close(server: Dovecot) -> None:
    connector = connector_factory.create_imap_connector(_config(server))
    assert not connector.connected

    with connector:
        assert connector.has_capability("IMAP4rev1")
        assert connector.connected
    assert not connector.connected

    with connector:
        manager = ImapEmailManager(connector)
        assert manager.select_folder("INBOX").exists == len(MESSAGES)


# --- the CLI's "check connection" ----------------------------------------------------------------


def test_mailbox_check_shows_the_folder_tree_to_people_and_nested_in_json(
    env: dict[str, str], server: Dovecot
) -> None:
    assert services.run_cli(["user", "add", "--email", "alice@example.com"], env).returncode == 0
    added = services.run_cli(
        ["mailbox", "add", "--owner", "alice@example.com", "--host", server.host, "--port",
         str(server.port), "--security", "none", "--username", USER, "--password-stdin"],
        env, stdin=PASSWORD.encode() + b"\n")
    assert added.returncode == 0, added.stderr
    mailbox_id = str(json.loads(added.stdout)["id"])

    text = services.run_cli(["mailbox", "check", mailbox_id], env)
    report = services.run_cli(["mailbox", "check", mailbox_id, "--json"], env)

    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    assert lines[0].startswith("ok: logged in to")
    assert lines[1].startswith("  INBOX  (inbox)")
    assert "    Été  (other)  \\HasNoChildren" in lines
    assert any(line.startswith("  Données  (other, not selectable)") for line in lines)
    assert "  Junk  (spam)  \\HasNoChildren \\Junk" in lines
    assert report.returncode == 0, report.stderr
    checked = json.loads(report.stdout)
    assert checked["ok"] is True
    flat = {f["name"]: f for f in checked["folders"]}  # the flat list keeps its keys
    assert set(flat["Données/Été"]) >= {"name", "raw_name", "delimiter", "flags", "type",
                                         "selectable"}
    assert flat["Données/Été"]["raw_name"] == "Donn&AOk-es/&AMk-t&AOk-"
    [donnees] = [f for f in checked["tree"] if f["name"] == "Données"]
    assert [(c["name"], c["path"], c["children"]) for c in donnees["children"]] == [
        ("Été", "Données/Été", []), ("Hiver", "Données/Hiver", [])]
