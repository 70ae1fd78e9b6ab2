"""Search in the local store (`mailferry messages search`, shared/search.py) against a real
PostgreSQL: what matches, in what order, only within one mailbox, and what a hostile query does."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest

from mailferry import db, search
from mailferry.devkit import services
from mailferry.messages import FetchedMessage
from mailferry.mime import parse_message
from mailferry.search import BadQuery, compile_query, search_messages
from mailferry.services.persister import store
from mailferry.services.persister.indexer import Indexer

BASE = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)
_uids = itertools.count(1)


def _raw(subject: str, body: str, *, sender: str = "Someone <someone@example.net>",
         to: Sequence[str] = ("Me <me@example.org>",), cc: Sequence[str] = (),
         days: int = 0, html: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Date"] = (BASE + timedelta(days=days)).strftime("%a, %d %b %Y %H:%M:%S +0000")
    msg["Message-ID"] = f"<{next(_uids)}.{days}@test>"
    if html is not None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(body)
    return msg.as_bytes()


def _store(conn: db.Connection, mailbox_id: int, raw: bytes, folder: str = "INBOX") -> int:
    """Stores one message the way the persister does; returns its messages.id."""
    folder_id = store.folder_id(conn, mailbox_id, folder)
    uid = next(_uids)
    fetched = FetchedMessage(uid=uid, internal_date=BASE, size=len(raw), raw=raw)
    incoming = store.Incoming(fetched=fetched, sha256=store.sha256(raw), new=True,
                              parsed=parse_message(raw))
    with conn.transaction():
        store.store_messages(conn, mailbox_id, folder_id, 1, [incoming], token=1)
    row = conn.execute("SELECT id FROM messages WHERE mailbox_id = %s AND sha256 = %s",
                       (mailbox_id, store.sha256(raw))).fetchone()
    assert row is not None
    return int(row["id"])


def _ids(conn: db.Connection, mailbox_id: int, query: str, **kwargs: object) -> list[int]:
    return [h.id for h in search_messages(conn, mailbox_id, query, **kwargs)]  # type: ignore[arg-type]


@pytest.fixture
def corpus(conn: db.Connection) -> dict[str, int]:
    """A mailbox with a few known messages; name -> messages.id."""
    mb = services.mailbox_row(conn)
    return {
        "mailbox": mb,
        "invoice": _store(conn, mb, _raw(
            "Invoice 2026-117 for October", "Please find the invoice attached. Quarterly report follows.",
            sender="Alice Martin <alice.martin@example.com>", to=["Bob <bob@example.org>"],
            cc=["Carol <carol@finance.example.net>"], days=1)),
        "report": _store(conn, mb, _raw(
            "Minutes", "The quarterly report is late; the report quarterly cycle moves.",
            sender="Dave <dave@example.com>", days=2)),
        "greetings": _store(conn, mb, _raw(
            "Réunion au café", "Viele Grüße aus München, und bis bald im CAFÉ.",
            sender="Jürgen Weiß <juergen@beispiel.de>", days=3)),
        "holiday": _store(conn, mb, _raw(
            "Holiday plans", "We fly to Lisbon in April, maybe Porto in March.", days=4)),
        "body_invoice": _store(conn, mb, _raw(
            "Re: lunch", "By the way, did the invoice arrive? It was sent Monday.", days=5)),
        "html": _store(conn, mb, _raw(
            "Newsletter", "", html="<html><body><p>Our <b>spectacular</b> autumn sale</p>"
                                   "<style>.zebra{color:red}</style></body></html>", days=6)),
    }


# --- what matches ------------------------------------------------------------------------------


def test_words_of_the_subject_match(conn: db.Connection, corpus: dict[str, int]) -> None:
    assert _ids(conn, corpus["mailbox"], "october") == [corpus["invoice"]]
    assert _ids(conn, corpus["mailbox"], "Holiday") == [corpus["holiday"]]


@pytest.mark.parametrize("query", [
    "alice.martin@example.com", "Alice", "martin", "alice.martin", "example.com",  # from
    "bob@example.org", "bob",  # to
    "carol@finance.example.net", "finance.example.net",  # cc
])
def test_addresses_match_whole_by_their_parts_and_by_display_name(
    conn: db.Connection, corpus: dict[str, int], query: str
) -> None:
    assert corpus["invoice"] in _ids(conn, corpus["mailbox"], query)


def test_words_of_the_body_match(conn: db.Connection, corpus: dict[str, int]) -> None:
    assert _ids(conn, corpus["mailbox"], "lisbon") == [corpus["holiday"]]


def test_an_html_only_body_is_searched_by_its_words_not_its_markup(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    assert _ids(conn, corpus["mailbox"], "spectacular") == [corpus["html"]]
    assert _ids(conn, corpus["mailbox"], "zebra") == []
    assert _ids(conn, corpus["mailbox"], "style") == []


@pytest.mark.parametrize("query", ["Grüße", "GRÜSSE", "grusse", "café", "CAFE", "cafe",
                                   "münchen", "MUNCHEN", "weiß", "Réunion", "reunion"])
def test_non_ascii_words_match_whatever_their_case_and_accents(
    conn: db.Connection, corpus: dict[str, int], query: str
) -> None:
    assert _ids(conn, corpus["mailbox"], query) == [corpus["greetings"]]


def test_a_quoted_phrase_matches_the_words_in_that_order_only(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    mb = corpus["mailbox"]
    assert set(_ids(conn, mb, '"quarterly report"')) == {corpus["invoice"], corpus["report"]}
    assert _ids(conn, mb, '"report quarterly"') == [corpus["report"]]
    assert _ids(conn, mb, '"attached invoice"') == []
    assert _ids(conn, mb, '"find invoice"') == []  # both words, not adjacent


def test_or_matches_either_and_binds_tighter_than_and(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    mb = corpus["mailbox"]
    assert set(_ids(conn, mb, "lisbon OR spectacular")) == {corpus["holiday"], corpus["html"]}
    assert _ids(conn, mb, "april lisbon OR spectacular") == [corpus["holiday"]]
    assert _ids(conn, mb, "lisbon or spectacular") == []  # lower-case "or" is a word


def test_a_minus_excludes_a_word_or_phrase(conn: db.Connection, corpus: dict[str, int]) -> None:
    mb = corpus["mailbox"]
    assert set(_ids(conn, mb, "invoice")) == {corpus["invoice"], corpus["body_invoice"]}
    assert _ids(conn, mb, "invoice -lunch") == [corpus["invoice"]]
    assert _ids(conn, mb, 'invoice -"quarterly report"') == [corpus["body_invoice"]]


def test_field_prefixes_look_only_in_that_part_of_the_message(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    mb = corpus["mailbox"]
    assert _ids(conn, mb, "subject:invoice") == [corpus["invoice"]]
    assert set(_ids(conn, mb, "body:invoice")) == {corpus["body_invoice"], corpus["invoice"]}
    assert _ids(conn, mb, "from:alice") == [corpus["invoice"]]
    assert _ids(conn, mb, "to:alice") == []
    assert _ids(conn, mb, "to:carol") == [corpus["invoice"]]  # to: means any recipient
    assert _ids(conn, mb, "from:bob") == []
    assert _ids(conn, mb, 'subject:"for october"') == [corpus["invoice"]]
    assert _ids(conn, mb, "invoice -from:alice") == [corpus["body_invoice"]]
    assert _ids(conn, mb, "re:lunch") == [corpus["body_invoice"]]  # not a field: plain words
    # header fields combined with words and exclusions anywhere
    assert _ids(conn, mb, "from:alice attached") == [corpus["invoice"]]
    assert _ids(conn, mb, "from:alice -quarterly") == []
    assert _ids(conn, mb, "to:bob -lunch") == [corpus["invoice"]]
    assert _ids(conn, mb, "from:alice OR from:dave") == [corpus["report"], corpus["invoice"]]
    assert set(_ids(conn, mb, "from:alice OR lisbon")) == {corpus["invoice"], corpus["holiday"]}


def test_header_terms_are_answered_by_the_small_header_vector(conn: db.Connection) -> None:
    only_headers = compile_query(conn, 'From:Alice subject:"Big Invoice" -draft')
    assert only_headers.head == "('alice':B) & ('big':A <-> 'invoice':A)"
    assert (only_headers.vector, only_headers.excluded) == (None, "('draft')")
    mixed = compile_query(conn, "from:alice report -draft -from:bob")
    assert mixed.head == "('alice':B)"
    assert mixed.vector == "('report') & !('draft') & !('bob':B)"
    assert mixed.excluded is None
    assert mixed.full == "('alice':B) & ('report') & !('draft') & !('bob':B)"


def test_a_subject_hit_ranks_before_a_body_only_hit(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    # the body-only hit is the newer one: rank wins over date
    hits = search_messages(conn, corpus["mailbox"], "invoice")
    assert [h.id for h in hits] == [corpus["invoice"], corpus["body_invoice"]]
    assert hits[0].rank > hits[1].rank


def test_equal_ranks_come_newest_first_and_the_limit_applies(conn: db.Connection) -> None:
    mb = services.mailbox_row(conn)
    ids = [_store(conn, mb, _raw("Weekly digest", "nothing new", days=d)) for d in range(5)]
    assert _ids(conn, mb, "digest") == ids[::-1]
    assert _ids(conn, mb, "digest", limit=2) == ids[::-1][:2]


# --- scope: one mailbox, live messages ---------------------------------------------------------


def test_another_mailbox_with_the_same_words_never_leaks(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    other = services.mailbox_row(conn, name="other")
    # the very same bytes too: stored once, but a message row per mailbox
    same = _raw("Invoice 2026-117 for October", "Please find the invoice attached.",
                sender="Alice Martin <alice.martin@example.com>", days=1)
    theirs = {_store(conn, other, same),
              _store(conn, other, _raw("Grüße", "invoice lisbon café", days=9))}
    for query in ("invoice", "october", "lisbon", "grüße", "alice", "from:alice"):
        ours = _ids(conn, corpus["mailbox"], query)
        assert ours and not theirs & set(ours), query
        assert set(_ids(conn, other, query)) <= theirs
    assert _ids(conn, other, "spectacular") == []


def test_expunged_placements_are_not_shown_and_fully_expunged_messages_are_not_found(
    conn: db.Connection
) -> None:
    mb = services.mailbox_row(conn)
    raw = _raw("Moved report", "budget figures")
    moved = _store(conn, mb, raw, folder="INBOX")
    _store(conn, mb, raw, folder="Archive")
    gone = _store(conn, mb, _raw("Deleted report", "budget figures too", days=1))
    inbox = store.folder_id(conn, mb, "INBOX")
    uids = [r["uid"] for r in conn.execute(
        "SELECT uid FROM message_folders WHERE folder_id = %s", (inbox,)).fetchall()]
    store.expunge(conn, inbox, 1, uids)  # both leave the inbox; one lives on in Archive
    [hit] = search_messages(conn, mb, "budget")
    assert (hit.id, hit.folders) == (moved, ["Archive"])
    assert gone != moved
    assert _ids(conn, mb, "budget", folder="INBOX") == []
    assert _ids(conn, mb, "budget", folder="Archive") == [moved]
    assert _ids(conn, mb, "budget", folder="Nope") == []


def test_a_five_megabyte_body_is_stored_and_its_beginning_is_searchable(
    conn: db.Connection
) -> None:
    mb = services.mailbox_row(conn)
    words = " ".join(f"w{i:07d}" for i in range(600_000))  # 5.4 MB of distinct words
    message = _store(conn, mb, _raw("Huge log", "needle " + words + " haystackend"))
    assert _ids(conn, mb, "needle") == [message]
    assert _ids(conn, mb, "w0000100") == [message]
    # only the first 100,000 characters of a body are indexed (the tsvector limit is 1 MB)
    assert _ids(conn, mb, "haystackend") == []


# --- deferred indexing -------------------------------------------------------------------------


def _waiting(conn: db.Connection, mailbox_id: int) -> int:
    return search.unindexed(conn, mailbox_id)


def test_storing_a_message_leaves_its_indexing_for_later_yet_a_search_finds_it_at_once(
    conn: db.Connection
) -> None:
    mb = services.mailbox_row(conn)
    message = _store(conn, mb, _raw("Quarterly figures", "the numbers"))
    assert _waiting(conn, mb) == 1  # the insert did not pay for the vectors
    assert _ids(conn, mb, "quarterly") == [message]
    assert _waiting(conn, mb) == 0


def test_a_search_indexes_only_its_own_mailbox_and_at_most_its_budget(
    conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, other = services.mailbox_row(conn, name="mine"), services.mailbox_row(conn, name="other")
    for n in range(5):
        _store(conn, mine, _raw(f"report {n}", "weekly report"))
    _store(conn, other, _raw("report", "weekly report"))
    monkeypatch.setattr(search, "INDEX_ON_SEARCH", 3)
    assert len(_ids(conn, mine, "report")) == 3  # the two not reached yet are not found...
    assert (_waiting(conn, mine), _waiting(conn, other)) == (2, 1)  # ...and are counted
    assert len(_ids(conn, mine, "report")) == 5


def test_a_message_postgresql_cannot_index_does_not_stop_the_others(conn: db.Connection) -> None:
    mb = services.mailbox_row(conn)
    before = _store(conn, mb, _raw("alpha report", "text"))
    poison = _store(conn, mb, _raw("poison report", "text"))
    after = _store(conn, mb, _raw("omega report", "text"))
    # What PostgreSQL answers for text beyond the tsvector limit (SQLSTATE 54000), for one message
    conn.execute("""
        CREATE OR REPLACE FUNCTION mailferry_search_head(subject text, from_addr text,
            to_addrs text[], cc_addrs text[], bcc_addrs text[]) RETURNS tsvector
        LANGUAGE plpgsql IMMUTABLE AS $$
        BEGIN
            IF subject LIKE 'poison%' THEN
                RAISE EXCEPTION 'string is too long for tsvector' USING ERRCODE = '54000';
            END IF;
            RETURN to_tsvector('mailferry_search', coalesce(subject, ''));
        END $$""")
    assert search.index_pending(conn, mailbox_id=mb) == 3
    assert _waiting(conn, mb) == 0  # nothing left to retry forever
    assert sorted(_ids(conn, mb, "report")) == sorted([before, after])
    empty = conn.execute("SELECT search_vector::text AS v FROM messages WHERE id = %s",
                         (poison,)).fetchone()
    assert empty == {"v": ""}


def test_the_background_indexer_waits_while_events_flow_then_catches_up(
    conn: db.Connection, database_url: str
) -> None:
    mb = services.mailbox_row(conn)
    for n in range(3):
        _store(conn, mb, _raw(f"note {n}", "text"))
    last_event = [time.monotonic() + 3600.0]  # an event "just now", for the next hour
    indexer = Indexer(database_url, lambda: last_event[0])
    indexer.start()
    try:
        time.sleep(2.5)
        assert _waiting(conn, mb) == 3, "indexed while the persister was busy with events"
        last_event[0] = 0.0  # the queue has gone quiet
        assert services.eventually(lambda: _waiting(conn, mb) == 0, timeout=30)
    finally:
        indexer.stop()
    vectors = conn.execute("SELECT count(*) AS n FROM messages WHERE mailbox_id = %s "
                           "AND search_vector IS NOT NULL AND search_head IS NOT NULL",
                           (mb,)).fetchone()
    assert vectors == {"n": 3}


# --- hostile queries ---------------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE messages; --", '"', '""', '"unterminated', "\\", "a\\b", "\\'", ":*",
    "invoice:*", "&|!()", "!invoice", "invoice & | lisbon", "(invoice", "<->", "<2>", "'a' <-> 'b'",
    "from:", "from:'; --", "subject:\"", "-", "--", "OR", "OR OR", "-OR", "\x00invoice",
    "ab\udcffcd", "日本語", "🙂",
    "%s", "%(q)s", "{}", "$1", "a" * 2500, " ".join(["x"] * 100),
]


def test_hostile_queries_give_results_or_a_clean_error(
    conn: db.Connection, corpus: dict[str, int]
) -> None:
    for query in HOSTILE:
        try:
            hits = search_messages(conn, corpus["mailbox"], query)
        except BadQuery as exc:
            assert "\n" not in str(exc), query
        else:
            assert all(h.mailbox_id == corpus["mailbox"] for h in hits), query
        row = conn.execute("SELECT count(*) AS n FROM messages").fetchone()
        assert row == {"n": len(corpus) - 1}, query


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
def cli_env(database_url: str) -> dict[str, str]:
    return {"MAILFERRY_DATABASE_URL": database_url, "MAILFERRY_LOG_FORMAT": "json"}


def test_the_command_prints_json_objects_with_stable_keys(
    cli_env: dict[str, str], corpus: dict[str, int]
) -> None:
    result = services.run_cli(["messages", "search", "--mailbox", str(corpus["mailbox"]),
                               "invoice", "--json"], cli_env)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["id"] for h in hits] == [corpus["invoice"], corpus["body_invoice"]]
    first = hits[0]
    assert list(first) == ["id", "mailbox_id", "sent_at", "from", "to", "subject", "folders",
                           "snippet", "rank"]
    assert first["mailbox_id"] == corpus["mailbox"]
    assert first["from"] == "Alice Martin <alice.martin@example.com>"
    assert first["to"] == ["Bob <bob@example.org>"]
    assert first["subject"] == "Invoice 2026-117 for October"
    assert first["folders"] == ["INBOX"]
    assert first["sent_at"].startswith("2026-10-02T09:00:00")
    assert "**invoice**" in first["snippet"]
    assert isinstance(first["rank"], float) and first["rank"] > hits[1]["rank"]


def test_the_command_prints_a_table_for_people(
    cli_env: dict[str, str], corpus: dict[str, int]
) -> None:
    result = services.run_cli(["messages", "search", "--mailbox", str(corpus["mailbox"]),
                               "--folder", "INBOX", "--limit", "1", "invoice"], cli_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "DATE", "FROM", "SUBJECT", "FOLDERS"]
    assert len(lines) == 2 and "Invoice 2026-117" in lines[1] and "INBOX" in lines[1]


def test_no_hits_is_an_empty_list_and_success(
    cli_env: dict[str, str], corpus: dict[str, int]
) -> None:
    result = services.run_cli(["messages", "search", "--mailbox", str(corpus["mailbox"]),
                               "nothingmatchesthis", "--json"], cli_env)
    assert (result.returncode, json.loads(result.stdout)) == (0, [])


@pytest.mark.parametrize(("args", "message"), [
    (["--mailbox", "999", "invoice"], "no mailbox with id 999"),
    (["--mailbox", "{mb}", "&|!()"], "the query has no words to search for"),
    (["--mailbox", "{mb}", "--", "-invoice"], "only exclusions"),
    (["--mailbox", "{mb}", "-invoice"], "No such option"),  # a leading minus needs `--`
    (["--mailbox", "{mb}", "--limit", "0", "invoice"], "--limit"),
    (["--mailbox", "{mb}"], "QUERY"),
])
def test_bad_usage_is_one_line_on_stderr_and_exit_code_2(
    cli_env: dict[str, str], corpus: dict[str, int], args: list[str], message: str
) -> None:
    args = [a.format(mb=corpus["mailbox"]) for a in args]
    result = services.run_cli(["messages", "search", "--json", *args], cli_env)
    assert result.returncode == 2, result
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("query", ["'; DROP TABLE messages; --", "\\'\"", "invoice:* & !(x|y)"])
def test_hostile_queries_through_the_command_never_crash_it(
    cli_env: dict[str, str], conn: db.Connection, corpus: dict[str, int], query: str
) -> None:
    result = services.run_cli(["messages", "search", "--mailbox", str(corpus["mailbox"]),
                               query, "--json"], cli_env)
    assert result.returncode in (0, 2), result
    assert b"Traceback" not in result.stderr
    if result.returncode == 0:
        assert isinstance(json.loads(result.stdout), list)
    assert conn.execute("SELECT count(*) AS n FROM messages").fetchone() == {"n": len(corpus) - 1}
