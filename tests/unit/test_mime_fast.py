"""The fast path of ``mailferry.mime`` (``_fast_tree``: bodies split with ``bytes.find`` instead of
read line by line by the feed parser) gives exactly what the feed parser's path gives: subject,
addresses, bodies, attachments with their decoded sizes, parse errors, every field. Proven on
the real-world corpus, on the generated corpus the benchmarks use, on hostile mail, and on
random structures; where the split cannot be sure, the message takes the feed parser's path.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailferry.devkit.corpus import corpus_messages, file_params, messages_in
from mailferry.devkit.mail import MessageFactory
from mailferry.mime import _fast_tree, parse_message
from tests.e2e.test_hostile_mail import CASES


def assert_same_parse(raw: bytes) -> None:
    """The fast path and the feed parser's path store the same fields for ``raw``."""
    assert parse_message(raw) == parse_message(raw, fast=False)


@pytest.mark.parametrize("path", file_params())
def test_every_real_world_message_parses_the_same_on_the_fast_path(path: Path) -> None:
    for raw in messages_in(path):
        assert_same_parse(raw)


def test_most_real_world_messages_take_the_fast_path() -> None:
    messages = corpus_messages()  # skips (or fails, where the corpus is required) without it
    fast = sum(_fast_tree(raw) is not None for _, raw in messages)
    assert fast >= len(messages) * 2 // 3, f"only {fast} of {len(messages)} on the fast path"


def test_every_generated_message_takes_the_fast_path_and_parses_the_same() -> None:
    factory = MessageFactory(seed=7, now=datetime(2026, 11, 30, tzinfo=UTC))
    kinds: set[str] = set()
    for index in range(200):
        raw, _, _, kind, _ = factory.message(index)
        kinds.add(kind)
        assert _fast_tree(raw) is not None, f"message {index} ({kind}) left the fast path"
        assert_same_parse(raw)
    assert kinds == {"text/plain", "multipart/alternative", "multipart/mixed"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_hostile_message_parses_the_same_on_the_fast_path(case: object) -> None:
    assert_same_parse(case.raw)  # type: ignore[attr-defined]


def _mixed(parts: bytes, *, top: bytes = b"Content-Type: multipart/mixed; boundary=b\r\n") -> bytes:
    return (b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m@example.com>\r\n" + top
            + b"\r\n" + parts)


TEXT = b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
FILE = (b"--b\r\nContent-Type: application/pdf; name=x.pdf\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\nQUJDRA==\r\n")

#: Messages the split must get right (it takes them) or hand over (it must not take them).
STRUCTURES = {
    "plain": (_mixed(TEXT + FILE + b"--b--\r\n"), True),
    "preamble and epilogue": (_mixed(b"preamble\r\n" + TEXT + FILE + b"--b--\r\nepilogue\r\n"),
                              True),
    "close delimiter with blanks, no final line break": (_mixed(TEXT + FILE + b"--b-- \t"), True),
    "delimiter with trailing blanks": (_mixed(TEXT.replace(b"--b\r\n", b"--b \t\r\n") + b"--b--"),
                                       True),
    "body line that only starts like a delimiter": (
        _mixed(TEXT + b"--b\r\nContent-Type: text/plain\r\n\r\n--bx\r\n--b--x\r\n--b--\r\n"),
        True),
    "LF line ends": (_mixed(TEXT + FILE + b"--b--\r\n").replace(b"\r\n", b"\n"), True),
    "mixed line ends": (_mixed(TEXT.replace(b"\r\n", b"\n") + FILE + b"--b--\n"), True),
    "nested multipart": (_mixed(b"--b\r\nContent-Type: multipart/alternative; boundary=c\r\n\r\n"
                                b"--c\r\nContent-Type: text/plain\r\n\r\nt\r\n--c\r\n"
                                b"Content-Type: text/html\r\n\r\n<p>h</p>\r\n--c--\r\n"
                                + FILE + b"--b--\r\n"), True),
    "a bare CR inside a body line": (
        _mixed(TEXT + b"--b\r\nContent-Type: text/plain\r\n\r\na\rb\r\n--b--\r\n"), True),
    "a bare CR before a delimiter": (
        _mixed(TEXT + b"--b\r\nContent-Type: text/plain\r\n\r\na\r--b\r\n" + FILE + b"--b--\r\n"),
        False),
    "a bare CR ending a delimiter": (_mixed(TEXT + FILE.replace(b"--b\r\n", b"--b\r") + b"--b--"),
                                     False),
    "a bare CR in a header block": (
        _mixed(TEXT + b"--b\r\nContent-Type: text/plain\rX: y\r\n\r\nx\r\n--b--\r\n"), False),
    "no close delimiter": (_mixed(TEXT + FILE), False),
    "no opening delimiter": (_mixed(b"just text\r\n--b--\r\n"), False),
    "two delimiters in a row": (_mixed(TEXT + b"--b\r\n" + FILE + b"--b--\r\n"), False),
    "a part without headers": (_mixed(TEXT + b"--b\r\n\r\nbare\r\n--b--\r\n"), False),
    "a part without a blank line": (_mixed(TEXT + b"--b\r\nContent-Type: text/plain\r\n--b--\r\n"),
                                    False),
    "a non-header line in the headers": (
        _mixed(TEXT + b"--b\r\nContent-Type: text/plain\r\nnot a header\r\n\r\nx\r\n--b--\r\n"),
        False),
    "an attached message": (_mixed(TEXT + b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
                                   b"Subject: inner\r\n\r\ninner body\r\n--b--\r\n"), False),
    "a digest": (_mixed(TEXT + b"--b--\r\n", top=b"Content-Type: multipart/digest; boundary=b\r\n"),
                 False),
    "a multipart in base64": (_mixed(TEXT + b"--b--\r\n",
                                     top=b"Content-Type: multipart/mixed; boundary=b\r\n"
                                         b"Content-Transfer-Encoding: base64\r\n"), False),
    "a multipart without a boundary": (_mixed(TEXT + b"--b--\r\n",
                                              top=b"Content-Type: multipart/mixed\r\n"), False),
    "headers only": (b"Subject: no body\r\nMessage-ID: <h@example.com>\r\n", False),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_a_structure_is_split_only_when_the_split_is_sure_and_parses_the_same(name: str) -> None:
    raw, taken = STRUCTURES[name]
    assert (_fast_tree(raw) is not None) is taken
    assert_same_parse(raw)


_LEAF_HEADERS = [
    b"Content-Type: text/plain; charset=utf-8\r\n", b"Content-Type: text/html\r\n",
    b"Content-Type: application/pdf; name=a.pdf\r\n", b"Content-Type: image/png\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment;\r\n filename*=utf-8''caf%C3%A9.txt\r\n",
    b"Content-Disposition: inline\r\n", b"Content-ID: <c@x>\r\n", b"X-Other: y\r\n",
]
_BODY_LINES = [b"hello", b"", b"--b0x", b"--b1--x", b"QUJDRA==", b"QUJD", b"!!", b"caf=C3=A9 =",
               b"text \xc3\xa9", b"\xff\xfe", b"\x00", b"From x", b" ", b"<p>hi</p>"]


@st.composite
def entities(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A well-formed entity (headers, blank line, body): a leaf, or a multipart of 1-3 parts."""
    if depth < 3 and draw(st.booleans()):
        boundary = b"b%d" % depth
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related"]))
        parts = draw(st.lists(entities(depth + 1), min_size=1, max_size=3))
        blanks = draw(st.sampled_from([b"", b" ", b"\t "]))
        preamble = draw(st.sampled_from([b"", b"This is MIME.\r\n", b"\r\n"]))
        epilogue = draw(st.sampled_from([b"", b"\r\n", b"epilogue\r\n"]))
        body = preamble + b"".join(b"--" + boundary + blanks + b"\r\n" + part + b"\r\n"
                                   for part in parts) + b"--" + boundary + b"--\r\n" + epilogue
        return (b"Content-Type: multipart/" + subtype + b"; boundary=\"" + boundary + b"\"\r\n\r\n"
                + body)
    headers = draw(st.lists(st.sampled_from(_LEAF_HEADERS), min_size=1, max_size=4))
    lines = draw(st.lists(st.sampled_from(_BODY_LINES), max_size=6))
    return b"".join(headers) + b"\r\n" + b"\r\n".join(lines)


_DAMAGE = [b"--b0\r\n", b"--b0--\r\n", b"--b1\r\n", b"\r\n", b"\r", b"\n", b"X: y\r\n",
           b"no colon\r\n", b" folded\r\n", b"Content-Type: message/rfc822\r\n", b"\x00"]


@settings(deadline=None, max_examples=300)
@given(entities(), st.booleans(),
       st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(_DAMAGE)), max_size=2))
def test_random_structures_parse_the_same_on_both_paths(
    entity: bytes, lf_only: bool, damage: list[tuple[int, bytes]],
) -> None:
    raw = bytearray(b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m@x>\r\n" + entity)
    if lf_only:
        raw = bytearray(raw.replace(b"\r\n", b"\n"))
    for position, piece in damage:
        raw[position % (len(raw) + 1):position % (len(raw) + 1)] = piece
    assert_same_parse(bytes(raw))
