"""The email channel against a real SMTP server (aiosmtpd) with STARTTLS and implicit TLS:
certificates verified, STARTTLS never skipped."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailferry.devkit import services
from mailferry.devkit.dovecot import make_tls_files
from mailferry.errors import ConfigError
from mailferry.services.notifier.channels import SmtpSender


class _Recorder:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_tls_files(tmp_path_factory.mktemp("smtp-tls"))


def _context(tls_files: tuple[Path, Path, Path]) -> ssl.SSLContext:
    _, cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def starttls_server(tls_files: tuple[Path, Path, Path]) -> Iterator[tuple[int, _Recorder]]:
    recorder, port = _Recorder(), services.free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port,
                            tls_context=_context(tls_files), require_starttls=True)
    controller.start()
    yield port, recorder
    controller.stop()


@pytest.fixture
def implicit_tls_server(tls_files: tuple[Path, Path, Path]) -> Iterator[tuple[int, _Recorder]]:
    recorder, port = _Recorder(), services.free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port,
                            ssl_context=_context(tls_files))
    controller.start()
    yield port, recorder
    controller.stop()


def test_starttls_with_a_trusted_certificate_delivers(
    starttls_server: tuple[int, _Recorder], tls_files: tuple[Path, Path, Path]
) -> None:
    port, recorder = starttls_server
    sender = SmtpSender(f"smtp+starttls://127.0.0.1:{port}", "mf@example.com", 10, tls_files[0])
    sender.send("alice@example.com", "Subject line", "Body")
    [(mail_from, rcpt, content)] = recorder.received
    assert (mail_from, rcpt) == ("mf@example.com", ["alice@example.com"])
    assert b"Subject: Subject line" in content


def test_implicit_tls_with_a_trusted_certificate_delivers(
    implicit_tls_server: tuple[int, _Recorder], tls_files: tuple[Path, Path, Path]
) -> None:
    port, recorder = implicit_tls_server
    SmtpSender(f"smtps://127.0.0.1:{port}", "mf@example.com", 10, tls_files[0]).send(
        "bob@example.com", "s", "b")
    assert [r[1] for r in recorder.received] == [["bob@example.com"]]


def test_an_untrusted_certificate_is_refused(starttls_server: tuple[int, _Recorder]) -> None:
    port, recorder = starttls_server
    with pytest.raises(ssl.SSLCertVerificationError):
        SmtpSender(f"smtp+starttls://127.0.0.1:{port}", "mf@example.com", 10, None).send(
            "alice@example.com", "s", "b")
    assert recorder.received == []


def test_starttls_is_never_skipped_when_the_server_does_not_offer_it() -> None:
    recorder, port = _Recorder(), services.free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)  # no TLS at all
    controller.start()
    try:
        with pytest.raises(smtplib.SMTPNotSupportedError):
            SmtpSender(f"smtp+starttls://127.0.0.1:{port}", "mf@example.com", 10, None).send(
                "alice@example.com", "s", "b")
    finally:
        controller.stop()
    assert recorder.received == []


def test_an_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="MAILFERRY_SMTP_URL"):
        SmtpSender("http://127.0.0.1", "mf@example.com", 10, None)
