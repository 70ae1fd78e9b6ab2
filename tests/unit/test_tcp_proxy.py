"""How the test proxy reads the commands a client sends (no sockets: the reader alone)."""

from __future__ import annotations

from mailferry.devkit.tcp_proxy import Command, _CommandReader


def _read(*chunks: bytes) -> list[str]:
    reader = _CommandReader()
    return [text for chunk in chunks for text in reader.feed(chunk)]


def test_a_command_is_recorded_without_its_tag() -> None:
    assert _read(b"A12 UID FETCH 1:9 (FLAGS)\r\n") == ["UID FETCH 1:9 (FLAGS)"]


def test_a_line_split_over_several_reads_is_one_command() -> None:
    assert _read(b"A1 EXAM", b"INE INBOX", b"\r", b"\nA2 NOOP\r\n") == ["EXAMINE INBOX", "NOOP"]


def test_login_and_authenticate_arguments_are_never_recorded() -> None:
    recorded = _read(b'A1 LOGIN bob "s3cret"\r\n', b"A2 AUTHENTICATE PLAIN AGJvYgBzM2NyZXQ=\r\n",
                     b"A3 AUTHENTICATE PLAIN\r\n", b"AGJvYgBzM2NyZXQ=\r\n")
    assert recorded == ["LOGIN ***", "AUTHENTICATE ***", "AUTHENTICATE ***"]
    assert not any("s3cret" in text or "AGJv" in text for text in recorded)


def test_a_password_sent_as_literal_is_skipped_byte_for_byte() -> None:
    # RFC 3501 4.3: {n} then CRLF then n bytes; the literal here looks like a command itself.
    recorded = _read(b"A1 LOGIN {3}\r\n", b"bob {15}\r\n", b"A9 NOOP\r\nA8 X\r\n", b"\r\n",
                     b"A2 SELECT INBOX\r\n")
    assert recorded == ["LOGIN ***", "SELECT INBOX"]


def test_a_non_synchronizing_literal_is_skipped_in_the_same_read() -> None:
    message = b"Subject: x\r\n\r\nA7 FETCH 1 BODY[]\r\n"
    recorded = _read(b"A1 APPEND INBOX (\\Seen) {%d+}\r\n%s\r\nA2 LOGOUT\r\n"
                     % (len(message), message))
    assert recorded == [f"APPEND INBOX (\\Seen) {{{len(message)}+}}", "LOGOUT"]


def test_nothing_is_read_after_starttls_or_from_an_implicit_tls_link() -> None:
    assert _read(b"A1 STARTTLS\r\n", b"A2 LOGIN bob pw\r\n") == ["STARTTLS"]
    assert _read(b"\x16\x03\x01\x02\x00\x01", b"\nA2 LOGIN bob pw\r\n") == []


def test_a_command_verb_names_uid_commands_in_full_whatever_the_case() -> None:
    assert Command(0.0, "uid fetch 1:* (FLAGS)").verb == "UID FETCH"
    assert Command(0.0, "EXAMINE \"Work\"").verb == "EXAMINE"
