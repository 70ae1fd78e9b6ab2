"""Reading what a watched server sends: STATUS lines (quoted, atom, literal names), and when a
folder's STATUS says it changed."""

from __future__ import annotations

from mailferry.imap.idle import moved, parse_status, quoted


def test_a_status_line_gives_the_raw_name_and_its_values() -> None:
    line = b'* STATUS "Work/2024" (MESSAGES 3 UIDNEXT 9 HIGHESTMODSEQ 12)'
    assert parse_status([line]) == ("Work/2024", {"MESSAGES": 3, "UIDNEXT": 9,
                                                  "HIGHESTMODSEQ": 12})


def test_inbox_is_one_folder_whatever_its_case_and_a_literal_name_is_read() -> None:
    assert parse_status([b"* STATUS inbox (MESSAGES 1)"]) == ("INBOX", {"MESSAGES": 1})
    assert parse_status([(b"* STATUS {4}", b"W\"rk"), b" (UIDNEXT 2)"]) == ('W"rk',
                                                                          {"UIDNEXT": 2})


def test_other_responses_and_garbage_are_no_status() -> None:
    assert parse_status([b"* 4 EXISTS"]) is None
    assert parse_status([b"* STATUS (((("]) is None


def test_a_folder_moved_only_when_a_value_both_carry_differs() -> None:
    assert not moved(None, {"MESSAGES": 1}), "the first sight of a folder is the baseline"
    assert not moved({"MESSAGES": 1, "UIDVALIDITY": 5}, {"MESSAGES": 1, "UNSEEN": 0})
    assert moved({"UIDNEXT": 4}, {"UIDNEXT": 5, "MESSAGES": 4})


def test_names_that_no_quoted_string_can_carry_are_not_watched() -> None:
    assert quoted('a"b\\c') == b'"a\\"b\\\\c"'
    assert quoted("Été") is None
    assert quoted("a\r\nb") is None
