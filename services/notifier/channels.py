"""The notifier's delivery channels besides the stored one: email (SMTP) and real time (AMQP)."""

from __future__ import annotations

import email.policy
import json
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mailferry import topology
from mailferry.broker import Publisher
from mailferry.errors import ConfigError

_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


class SmtpSender:
    """Sends one email per call over ``smtp://`` (plain, for a local relay), ``smtp+starttls://``
    (STARTTLS required, never downgraded) or ``smtps://`` (implicit TLS); certificates verified."""

    def __init__(self, url: str, sender: str, timeout: float, ca_file: Path | None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _PORTS or not parts.hostname:
            raise ConfigError("MAILFERRY_SMTP_URL must look like smtp+starttls://user:pass@host:587 "
                              "(schemes: smtp, smtp+starttls, smtps)")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or _PORTS[parts.scheme]
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.sender = sender
        self.timeout = timeout
        self.tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def send(self, to: str, subject: str, body: str) -> None:
        # Long subjects stay on one line (RFC 5322 allows 998 characters): the stdlib's folding
        # at 78 breaks right after "Subject:", which some clients show as a leading space.
        message = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
        message["From"] = self.sender
        message["To"] = to
        # A header value may not hold a line break (the policy raises, so the email would never
        # go out); titles quote mailbox names, which are free text: flatten them to one line.
        message["Subject"] = " ".join(subject.split())
        message.set_content(body)
        smtp: smtplib.SMTP
        if self.scheme == "smtps":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self.tls)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with smtp:
            if self.scheme == "smtp+starttls":
                smtp.starttls(context=self.tls)  # raises SMTPNotSupportedError if not offered
            if self.username is not None:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)


class RealtimePublisher:
    """Publishes a notification on ``mailferry.notifications`` with the key ``user.<id>``."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def send(self, user_id: int, payload: dict[str, Any]) -> None:
        self.publisher.publish_raw(
            json.dumps(payload, default=str).encode(),
            exchange=topology.NOTIFICATIONS.name,
            routing_key=topology.user_routing_key(user_id),
            type_="Notification",
            # Nobody subscribed (the person is offline) is normal: the login inbox and email
            # carry the notification anyway.
            mandatory=False,
        )
