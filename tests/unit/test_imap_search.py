"""How search queries are encoded for IMAP (RFC 3501 / RFC 9051 ``search-key``), without a server:
every value stays one argument, whatever it contains."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailferry.imap import ImapConfig, encode_folder_name
from mailferry.imap.search import ImapLiteral, SearchQueryBuilder, lowest_open_uid

b = SearchQueryBuilder()


def wire(builder: SearchQueryBuilder) -> tuple[str | None, tuple[bytes | ImapLiteral, ...]]:
    return builder.get().encode()


def test_an_empty_query_searches_all_messages() -> None:
    assert wire(b) == (None, (b"ALL",))
    assert str(b.get()) == "ALL"


@pytest.mark.parametrize(("builder", "expected"), [
    (b.from_("test@test.com"), b'FROM "test@test.com"'),
    (b.to("bob"), b'TO "bob"'),
    (b.cc("carol"), b'CC "carol"'),
    (b.bcc("dave"), b'BCC "dave"'),
    (b.subject("notification"), b'SUBJECT "notification"'),
    (b.body("hello world"), b'BODY "hello world"'),
    (b.text("x"), b'TEXT "x"'),
    (b.header("X-Mailer", "mutt"), b'HEADER X-Mailer "mutt"'),
    (b.since(date(2024, 2, 1)), b"SINCE 1-Feb-2024"),
    (b.before(date(2023, 12, 31)), b"BEFORE 31-Dec-2023"),
    (b.on(datetime(2024, 3, 9, 23, 59, tzinfo=UTC)), b"ON 9-Mar-2024"),
    (b.sent_since(date(2024, 1, 1)), b"SENTSINCE 1-Jan-2024"),
    (b.seen().unseen().flagged().unflagged(), b"SEEN UNSEEN FLAGGED UNFLAGGED"),
    (b.answered().unanswered().draft().undraft(), b"ANSWERED UNANSWERED DRAFT UNDRAFT"),
    (b.deleted().undeleted(), b"DELETED UNDELETED"),
    (b.keyword("$Forwarded").unkeyword("Work"), b"KEYWORD $Forwarded UNKEYWORD Work"),
    (b.larger(1000).smaller(5000), b"LARGER 1000 SMALLER 5000"),
    (b.uid("1:100"), b"UID 1:100"),
    (b.uid("5,7:*"), b"UID 5,7:*"),
    (b.uid(42), b"UID 42"),
    (b.uid(range(1, 101)), b"UID 1:100"),
    (b.uid([7, 1, 2, 3, 9, 10]), b"UID 1:3,7,9:10"),
])
def test_each_key_is_encoded_as_the_rfc_grammar_says(builder: SearchQueryBuilder,
                                                       expected: bytes) -> None:
    assert wire(builder) == (None, (expected,))


def test_keys_one_after_another_must_all_match() -> None:
    query = b.from_("test@test.com").subject("notification").unseen()
    assert wire(query) == (None, (b'FROM "test@test.com" SUBJECT "notification" UNSEEN',))


def test_or_and_not_take_parts_and_parenthesize_parts_of_several_keys() -> None:
    query = b.or_(b.subject("a"), b.from_("x").seen()).not_(b.flagged().answered())
    assert wire(query) == (None, (b'OR SUBJECT "a" (FROM "x" SEEN) NOT (FLAGGED ANSWERED)',))


def test_or_of_three_parts_nests_to_the_right() -> None:
    assert wire(b.or_(b.seen(), b.flagged(), b.answered())) == (
        None, (b"OR SEEN OR FLAGGED ANSWERED",))


def test_an_empty_part_matches_all() -> None:
    assert wire(b.not_(b)) == (None, (b"NOT ALL",))


def test_a_builder_is_immutable_and_can_be_reused_as_a_factory() -> None:
    base = b.unseen()
    one, two = base.subject("one"), base.subject("two")
    assert str(base.get()) == "UNSEEN"
    assert str(one.get()) == 'UNSEEN SUBJECT "one"'
    assert str(two.get()) == 'UNSEEN SUBJECT "two"'
    assert one.get() == b.unseen().subject("one").get()  # queries compare by value
    with pytest.raises(AttributeError):
        one.get().keys = ()  # type: ignore[misc]


def test_queries_can_be_parts_too() -> None:
    part = b.subject("x").get()
    assert b.or_(part, b.seen()).get() == b.or_(b.subject("x"), b.seen()).get()


def test_quotes_and_backslashes_are_escaped_inside_a_quoted_string() -> None:
    assert wire(b.subject('say "hi" \\ bye')) == (None, (b'SUBJECT "say \\"hi\\" \\\\ bye"',))


@pytest.mark.parametrize("value", [")", "(", "{5}", '"', "\\", "*", "%", "]", "a) SEEN (b"])
def test_imap_syntax_characters_in_a_value_stay_inside_the_quoted_string(value: str) -> None:
    _, (text,) = wire(b.subject(value))
    assert isinstance(text, bytes)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    assert text == b'SUBJECT "' + escaped.encode() + b'"'


@pytest.mark.parametrize("value", ["x\r\nA001 LOGOUT", "{5}\r\n", "a\rb", "a\nb"])
def test_cr_or_lf_makes_the_value_a_literal_that_the_server_reads_by_length(value: str) -> None:
    charset, pieces = wire(b.subject(value).seen())
    assert charset is None  # ASCII: no CHARSET needed
    assert pieces == (b"SUBJECT ", ImapLiteral(value.encode()), b" SEEN")


@pytest.mark.parametrize("value", ["Grüße", "日本", "naïve ) {3}"])
def test_non_ascii_goes_as_a_utf8_literal_with_charset_utf8(value: str) -> None:
    charset, pieces = wire(b.or_(b.subject(value), b.body("plain")))
    assert charset == "UTF-8"
    assert pieces == (b"OR SUBJECT ", ImapLiteral(value.encode("utf-8")), b' BODY "plain"')


def test_a_literal_inside_parentheses_keeps_the_parentheses_outside_it() -> None:
    _, pieces = wire(b.not_(b.subject("Été").seen()))
    assert pieces == (b"NOT (SUBJECT ", ImapLiteral("Été".encode()), b" SEEN)")


def test_str_shows_literals_without_sending_them() -> None:
    assert str(b.subject("Été").get()) == "SUBJECT {literal 'Été'}"


def test_nul_is_refused_with_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="NUL"):
        b.subject("a\0b")
    with pytest.raises(ValueError, match="NUL"):
        b.header("X-A", "\0")


@pytest.mark.parametrize("name", ["", "X Header", "X:Y", "X(Y", 'X"', "X\\", "X{5}", "X\r\n",
                                  "Été", "X*", "X%", "X]"])
def test_a_header_name_must_be_an_atom_and_a_field_name(name: str) -> None:
    with pytest.raises(ValueError, match="header field name"):
        b.header(name, "v")


@pytest.mark.parametrize("flag", ["", "\\Seen", "a b", "x)", "Été"])
def test_a_keyword_must_be_an_atom(flag: str) -> None:
    with pytest.raises(ValueError, match="keyword"):
        b.keyword(flag)


@pytest.mark.parametrize("uids", ["", "0", "1:", ":5", "1 2", "1:100 SEEN", "a", "1,,2",
                                  "99999999999", range(5, 5), [], [0], [-1], "1:100\r\n"])
def test_a_uid_set_is_checked_against_the_sequence_set_grammar(uids: object) -> None:
    with pytest.raises(ValueError):
        b.uid(uids)  # type: ignore[arg-type]


def test_sizes_must_be_32_bit_non_negative_numbers() -> None:
    with pytest.raises(ValueError):
        b.larger(-1)
    with pytest.raises(ValueError):
        b.smaller(2**32)
    with pytest.raises(TypeError):
        b.larger("10")  # type: ignore[arg-type]


def test_dates_must_be_dates() -> None:
    with pytest.raises(TypeError):
        b.since("2024-01-01")  # type: ignore[arg-type]


def test_the_open_uid_bound_is_known_so_star_matches_can_be_dropped() -> None:
    assert lowest_open_uid(b.uid("101:*").since(date(2024, 1, 1)).get()) == 101
    assert lowest_open_uid(b.uid("1:100").get()) is None
    assert lowest_open_uid(b.get()) is None


@given(st.text())
def test_no_value_can_add_a_command_line_or_leave_its_string(value: str) -> None:
    """Whatever the value: either refused (NUL), or one quoted string without CR/LF whose
    unescaped content is the value, or one literal holding exactly its UTF-8 bytes."""
    try:
        charset, pieces = b.subject(value).get().encode()
    except ValueError:
        assert "\0" in value
        return
    if len(pieces) == 1:
        (text,) = pieces
        assert isinstance(text, bytes) and b"\r" not in text and b"\n" not in text
        inner = text.removeprefix(b"SUBJECT ")
        assert inner.startswith(b'"') and inner.endswith(b'"')
        body = inner[1:-1].decode("ascii")
        # every quote and backslash inside is escaped, so the string cannot end early
        unescaped, i = [], 0
        while i < len(body):
            if body[i] == "\\":
                assert body[i + 1] in '"\\'
                i += 1
            else:
                assert body[i] != '"'
            unescaped.append(body[i])
            i += 1
        assert "".join(unescaped) == value
        assert charset is None
    else:
        assert pieces == (b"SUBJECT ", ImapLiteral(value.encode("utf-8")))
        assert charset == ("UTF-8" if not value.isascii() else None)


def test_folder_names_are_sent_in_modified_utf7_unless_they_already_are() -> None:
    assert encode_folder_name("Données/Été") == "Donn&AOk-es/&AMk-t&AOk-"
    assert encode_folder_name("Donn&AOk-es/&AMk-t&AOk-") == "Donn&AOk-es/&AMk-t&AOk-"
    assert encode_folder_name("INBOX") == "INBOX"
    assert encode_folder_name("AT&T") == "AT&-T"  # not valid modified UTF-7: a display name
    with pytest.raises(ValueError):
        encode_folder_name("a\r\nb")


def test_imap_config_is_built_positionally_as_in_imapbundle_or_by_keyword() -> None:
    positional = ImapConfig("imap.example.com", 993, "ssl", "user", "pwd", timeout=20)
    keywords = ImapConfig(host="imap.example.com", port=993, security="ssl", username="user",
                          password="pwd", timeout=20)
    assert positional == keywords
    assert positional.password.get_secret_value() == "pwd"
    assert "pwd" not in repr(positional)
