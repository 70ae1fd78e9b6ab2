"""Large attachments are thinned before parsing (mailferry.mime._thin): the result is the parse of
the whole message, proven on the real-world corpus and on generated structures, for a fraction
of the memory."""

from __future__ import annotations

import base64
import random
import tracemalloc
from pathlib import Path

import pytest

import mailferry.mime
from mailferry.devkit.corpus import file_params, messages_in
from mailferry.mime import parse_message


def _attachment_message(sizes: list[int], *, nested: bool = False, boundary: str = "b1",
                        seed: int = 1) -> bytes:
    rng = random.Random(seed)
    parts = [b"Content-Type: text/plain; charset=utf-8\r\n\r\nSee attached.\r\n"]
    for n, size in enumerate(sizes):
        data = base64.encodebytes(rng.randbytes(size)).replace(b"\n", b"\r\n")
        parts.append(b"Content-Type: application/octet-stream; name=\"f%d.bin\"\r\n"
                     b"Content-Disposition: attachment; filename=\"f%d.bin\"\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" % (n, n) + data)
    inner = b"".join(b"--" + boundary.encode() + b"-x\r\n" + p for p in parts) \
        + b"--" + boundary.encode() + b"-x--\r\n"
    if nested:
        body = (b"--" + boundary.encode() + b"\r\nContent-Type: multipart/mixed; boundary=\""
                + boundary.encode() + b"-x\"\r\n\r\n" + inner + b"--" + boundary.encode()
                + b"--\r\nepilogue\r\n")
        outer = boundary
    else:
        body, outer = inner, boundary + "-x"
    return (b"From: a@example.com\r\nSubject: files\r\nMessage-ID: <t@example.com>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + outer.encode()
            + b"\"\r\n\r\npreamble\r\n" + body)


@pytest.fixture
def thin_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailferry.mime, "THIN_PART", 1)


@pytest.mark.parametrize("path", file_params())
def test_every_corpus_message_parses_the_same_thinned(path: Path, thin_everything: None) -> None:
    for raw in messages_in(path):
        assert parse_message(raw, thin_above=0) == parse_message(raw, thin_above=1 << 40, fast=False)


@pytest.mark.parametrize("nested", [False, True])
def test_generated_attachments_parse_the_same_thinned_and_are_thinned(
    nested: bool, thin_everything: None,
) -> None:
    raw = _attachment_message([10, 3000, 70000], nested=nested)
    thinned, sizes = mailferry.mime._thin(raw)
    assert sorted(sizes.values()) == [10, 3000, 70000]
    assert len(thinned) < len(raw) / 10
    whole = parse_message(raw, thin_above=1 << 40, fast=False)
    assert parse_message(raw, thin_above=0) == whole
    assert [a.size for a in whole.attachments] == [10, 3000, 70000]


@pytest.mark.parametrize("damage", [
    lambda raw: raw.replace(b"b1-x--\r\n", b""),  # no close delimiter
    lambda raw: raw.replace(b"Content-Transfer-Encoding: base64\r\n\r\n", b"Content-"
                            b"Transfer-Encoding: base64\r\n\r\n!!", 1),  # not plain base64
    lambda raw: raw.replace(b"boundary=\"b1-x\"", b"boundary=\"\""),  # no usable boundary
])
def test_a_message_whose_structure_is_not_clean_is_parsed_whole(damage: object,
                                                                thin_everything: None) -> None:
    raw = damage(_attachment_message([5000, 6000]))  # type: ignore[operator]
    assert parse_message(raw, thin_above=0) == parse_message(raw, thin_above=1 << 40, fast=False)


def test_a_large_attachment_costs_the_parser_a_fraction_of_its_size() -> None:
    raw = _attachment_message([12 * 1024 * 1024])
    tracemalloc.start()
    try:
        parsed = parse_message(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parsed.attachments[0].size == 12 * 1024 * 1024
    assert peak < len(raw) * 0.25, f"peak {peak} for {len(raw)} bytes"
