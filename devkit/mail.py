"""The one mail generator of the tests, the demo and the benchmarks: RFC 822 messages on demand.

Every generator is deterministic for a seed (a ``random.Random`` or a seed number), so a failing
test or a surprising figure can be reproduced. Pick by use:

- ``MessageFactory``: realistic mail for the benchmarks: log-normal sizes (median about 6 KB, the
  long tail carrying base64 attachments), text/plain, multipart/alternative and multipart/mixed,
  quoted-printable and 8bit, encoded words, internal dates within the last year, flags.
- ``plain_message``: a plain text message of about a given size, unique by its number (fault tests
  that write thousands of messages straight into a Maildir).
- ``attachment_message``: one valid message of a given size, mostly a base64 attachment (a huge
  genuine message for the memory benchmarks).
- ``friendly_message`` / ``dated_mail``: a plausible French-speaking mailbox for the demo, with a
  few attachments and dates both within and older than the first-sync window of a year.
"""

from __future__ import annotations

import base64
import email.header
import email.utils
import html
import quopri
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr

from mailferry.devkit.dovecot import MaildirMessage

# Sizes: log-normal with a median of 6 KB and a mean of about 16.5 KB, i.e. 20,000 messages are
# about 330 MB as measured on real mailboxes (DESIGN.md). sigma follows from mean/median:
# mean = median * exp(sigma^2 / 2)  =>  sigma = sqrt(2 * ln(16.5 / 6)) ~ 1.42.
SIZE_MEDIAN = 6_000
SIZE_SIGMA = 1.42
SIZE_MIN = 700
SIZE_MAX = 20 * 1024 * 1024  # far below the fetcher's 64 MB limit: every message is carried
ATTACHMENT_FROM = 32 * 1024  # larger messages are multipart/mixed with a base64 attachment
YEAR_DAYS = 360  # internal dates within the last year, so the first-sync window holds them all

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "invoice meeting quarter release budget server deploy schedule review contract shipment "
    "report customer ticket order payment draft agenda minutes"
)
_WORDS = _WORD_TEXT.split()
_ACCENTED_WORDS = ("café", "déjà", "naïve", "Grüße", "über", "señor", "façade", "smörgåsbord",
                   "Привет", "日本語", "Ελλάδα", "zürich", "crème", "brûlée")
_SUBJECTS_ASCII = (
    "Quarterly report", "Re: meeting on Monday", "Invoice {n}", "Fwd: contract draft",
    "Your order {n} has shipped", "Release notes {n}", "Re: Re: budget review",
    "Ticket #{n}: server unreachable", "Lunch?", "Minutes of the board meeting",
)
_SUBJECTS_UNICODE = (
    "Réunion de lundi", "Überweisung bestätigt {n}", "Счёт за март {n}", "会議の議事録",
    "Café ☕ demain ?", "Ελληνικά νέα {n}", "Facture n° {n}", "Año nuevo, ¿qué tal?",
)
_NAMES = ("Alice Martin", "Bob Stone", "Chloé Dubois", "Dmitri Ivanov", "Eve Adams",
          "Frank Müller", "Grace Hopper", "Hiro Tanaka", "Inès García", "Jack White")
_OOXML = "application/vnd.openxmlformats-officedocument"
_ATTACHMENTS = (
    ("report.pdf", "application/pdf"),
    ("photo.jpg", "image/jpeg"),
    ("archive.zip", "application/zip"),
    ("slides.pptx", f"{_OOXML}.presentationml.presentation"),
    ("données.xlsx", f"{_OOXML}.spreadsheetml.sheet"),
)


class MessageFactory:
    """Deterministic realistic messages: the same seed gives the same bytes (apart from dates,
    which are relative to now so the first-sync window of 365 days always covers them)."""

    def __init__(self, seed: int, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = now
        # A pool of wrapped paragraphs, assembled into bodies: generating every word of 300 MB of
        # text one by one would make the set-up slower than the thing measured.
        self.paragraphs = [self._paragraph() for _ in range(256)]

    def _paragraph(self) -> str:
        words = []
        for _ in range(self.rng.randint(40, 160)):
            pool = _ACCENTED_WORDS if self.rng.random() < 0.03 else _WORDS
            words.append(self.rng.choice(pool))
        words[0] = words[0].capitalize()
        lines, line = [], ""
        for word in words:
            if len(line) + len(word) + 1 > 72:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line + ".")
        return "\n".join(lines)

    def _text(self, budget: int) -> str:
        """Paragraphs up to about ``budget`` characters (at least one)."""
        out: list[str] = []
        size = 0
        while size < budget or not out:
            paragraph = self.rng.choice(self.paragraphs)
            out.append(paragraph)
            size += len(paragraph) + 2
        return "\n\n".join(out)[: max(budget, 40)]

    def _text_part(self, text: str, subtype: str = "plain") -> str:
        """One text part; half quoted-printable, half 8bit UTF-8, both common in the wild."""
        if self.rng.random() < 0.5:
            body = quopri.encodestring(text.encode("utf-8")).decode("ascii")
            cte = "quoted-printable"
        else:
            body, cte = text, "8bit"
        return (f"Content-Type: text/{subtype}; charset=utf-8\n"
                f"Content-Transfer-Encoding: {cte}\n\n{body}\n")

    def _html(self, text: str) -> str:
        paragraphs = "".join(f"<p>{html.escape(p)}</p>\n" for p in text.split("\n\n"))
        return f"<html><head><meta charset=\"utf-8\"></head><body>\n{paragraphs}</body></html>"

    def _address(self) -> str:
        name = self.rng.choice(_NAMES)
        local = name.split()[0].lower().encode("ascii", "ignore").decode() or "user"
        mailbox = f"{local}.{self.rng.randint(1, 999)}@example.{self.rng.choice(('com', 'org'))}"
        if name.isascii():
            return f"{name} <{mailbox}>"
        return f"{email.header.Header(name, 'utf-8').encode()} <{mailbox}>"

    def message(self, index: int) -> tuple[bytes, datetime, list[str], str, bool]:
        """(raw bytes with CRLF line ends, internal date, flags, kind, non-ASCII subject)."""
        rng = self.rng
        target = int(min(max(rng.lognormvariate(0, SIZE_SIGMA) * SIZE_MEDIAN, SIZE_MIN), SIZE_MAX))
        when = self.now - timedelta(seconds=rng.uniform(60, YEAR_DAYS * 86400))
        unicode_subject = rng.random() < 0.15
        template = rng.choice(_SUBJECTS_UNICODE if unicode_subject else _SUBJECTS_ASCII)
        subject = template.format(n=rng.randint(1000, 99999))
        encoded_subject = (email.header.Header(subject, "utf-8").encode(linesep="\n")
                           if unicode_subject else subject)
        boundary = f"=_bench_{self.seed}_{index}_{rng.getrandbits(32):08x}"
        headers = (
            f"Return-Path: <sender{index}@example.com>\n"
            f"Received: from mx.example.com (mx.example.com [192.0.2.{index % 250 + 1}])\n"
            f"\tby imap.example.net with ESMTPS id {rng.getrandbits(48):012x};\n"
            f"\t{email.utils.format_datetime(when)}\n"
            f"From: {self._address()}\n"
            f"To: {self._address()}\n"
            + (f"Cc: {self._address()}\n" if rng.random() < 0.3 else "")
            + f"Subject: {encoded_subject}\n"
            f"Date: {email.utils.format_datetime(when - timedelta(seconds=rng.randint(1, 600)))}\n"
            f"Message-ID: <{index}.{self.seed}.{rng.getrandbits(64):016x}@bench.mailferry.test>\n"
            "MIME-Version: 1.0\n"
        )
        room = max(target - len(headers) - 200, 40)
        if target >= ATTACHMENT_FROM:
            kind = "multipart/mixed"
            text = self._text(rng.randint(200, 3000))
            name, ctype = rng.choice(_ATTACHMENTS)
            disposition = (f'attachment; filename="{name}"' if name.isascii()
                           else f"attachment; filename*=utf-8''{_percent(name)}")
            payload = base64.encodebytes(rng.randbytes(max((room - len(text)) * 57 // 78, 1)))
            body = (
                f'Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
                "This is a multi-part message in MIME format.\n\n"
                f"--{boundary}\n{self._text_part(text)}\n"
                f"--{boundary}\nContent-Type: {ctype}; name=\"{name}\"\n"
                f"Content-Transfer-Encoding: base64\nContent-Disposition: {disposition}\n\n"
                f"{payload.decode('ascii')}\n--{boundary}--\n"
            )
        elif rng.random() < 0.5:
            kind = "text/plain"
            body = self._text_part(self._text(room))
        else:
            kind = "multipart/alternative"
            text = self._text(room * 2 // 5)
            body = (
                f'Content-Type: multipart/alternative; boundary="{boundary}"\n\n'
                f"--{boundary}\n{self._text_part(text)}\n"
                f"--{boundary}\n{self._text_part(self._html(text), 'html')}\n"
                f"--{boundary}--\n"
            )
        raw = (headers + body).replace("\n", "\r\n").encode("utf-8")
        flags = [flag for flag, p in (("\\Seen", 0.7), ("\\Answered", 0.1), ("\\Flagged", 0.05))
                 if rng.random() < p]
        return raw, when, flags, kind, unicode_subject


def _percent(text: str) -> str:
    """RFC 2231 percent-encoding of a UTF-8 filename."""
    return "".join(chr(b) if (chr(b).isalnum() and b < 128) or chr(b) in ".-_" else f"%{b:02X}"
                   for b in text.encode("utf-8"))


_PLAIN_WORDS = ("ferry", "mail", "queue", "harbour", "crate", "lease", "token", "broker", "tide",
          "anchor", "cargo", "pier", "rope", "signal", "storm", "lantern", "route", "deck")


@dataclass
class Written:
    """What ``generate`` wrote to the Maildir, for the checks and the summary."""

    count: int = 0
    total_bytes: int = 0
    sizes: list[int] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    unicode_subjects: int = 0


def generate(factory: MessageFactory, count: int, corpus: Written
             ) -> Iterator[tuple[bytes, datetime, list[str]]]:
    """Messages for ``Dovecot.fill_maildir``, recording sizes on the way (nothing kept in memory:
    330 MB of messages need not live in the benchmark process)."""
    for index in range(count):
        raw, when, flags, kind, unicode_subject = factory.message(index)
        corpus.count += 1
        corpus.total_bytes += len(raw)
        corpus.sizes.append(len(raw))
        corpus.kinds[kind] = corpus.kinds.get(kind, 0) + 1
        corpus.unicode_subjects += unicode_subject
        yield raw, when, flags


def plain_message(n: int, rng: random.Random, size: int = 2500) -> bytes:
    """A plain message of about ``size`` bytes (a few KB), unique by its number."""
    lines = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(_PLAIN_WORDS) for _ in range(12))
        lines.append(line)
        total += len(line) + 2
    body = "\r\n".join(lines)
    return (f"From: sender{n % 37}@example.com\r\nTo: alice@example.com\r\n"
            f"Subject: generated message {n}\r\nMessage-ID: <gen-{n}@faults.test>\r\n"
            f"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n").encode()


def attachment_message(size: int, seed: int = 60, subject: str = "sixty megabytes") -> bytes:
    """A valid message of about ``size`` bytes: a text part and a base64 attachment."""
    payload = random.Random(seed).randbytes(size * 3 // 4 * 76 // 78 - 1024)  # CRLF every 76
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: big@example.com\r\nTo: user@example.com\r\nSubject: " + subject.encode()
            + b"\r\n"
            b"Message-ID: <big@bench.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
            b"Content-Type: application/octet-stream; name=big.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b--\r\n")


_PEOPLE = [
    ("Camille Martin", "camille.martin@example.org"),
    ("Léa Dubois", "lea.dubois@example.net"),
    ("Hugo Lefèvre", "hugo.lefevre@example.org"),
    ("Zoé Moreau", "zoe@example.com"),
    ("Noah Garnier", "noah.garnier@example.net"),
    ("Inès Roussel", "ines.roussel@example.org"),
    ("Paul Fontaine", "paul@example.com"),
    ("Chloé Faure", "chloe.faure@example.net"),
]
_DEMO_SUBJECTS = [
    "Réunion de lundi", "Budget {year}", "Compte rendu du comité", "Déjeuner vendredi ?",
    "Relecture du devis n°{n}", "Planning de l'été", "Facture {n}", "Photos du séminaire",
    "Question sur le contrat", "Mise à jour du projet Hélios", "Billets de train pour Lyon",
    "Accès au serveur de test", "Café ☕ demain matin ?", "Nouvelle version de la maquette",
]
_LINES = [
    "Bonjour,",
    "Voici les éléments dont nous avons parlé ce matin.",
    "Peux-tu me dire ce que tu en penses d'ici jeudi ?",
    "J'ai mis à jour le document partagé avec les dernières remarques.",
    "La réunion est déplacée à 14 h, même salle.",
    "Merci pour ton retour rapide, c'est très clair.",
    "Il reste deux points à régler avant la livraison.",
    "Je te joins le fichier, dis-moi s'il manque quelque chose.",
]
# A 1x1 _PNG and the start of a _PDF: enough for a client to show "image" and "document".
_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000050001"
    "0d0a2db40000000049454e44ae426082"
)
_PDF = b"%_PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def friendly_message(rng: random.Random, folder: str, n: int, when: datetime,
                     owner: str = "demo@example.com") -> bytes:
    """One plausible message; every 12th one carries an attachment."""
    sent = folder == "Sent"
    other = rng.choice(_PEOPLE)
    me = ("Demo", owner)
    sender, recipient = (me, other) if sent else (other, me)
    subject = rng.choice(_DEMO_SUBJECTS).format(year=when.year, n=1000 + n)
    if rng.random() < 0.25:
        subject = f"Re: {subject}"
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr(sender)
    msg["To"] = formataddr(recipient)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = f"<demo.{zlib.crc32(folder.encode()):08x}.{n}@mailferry.example>"
    body = [_LINES[0], "", *rng.sample(_LINES[1:], 3), "", f"— {sender[0]}"]
    msg.set_content("\n".join(body) + "\n")
    if n % 12 == 5:
        kind = (n // 12) % 3
        if kind == 0:
            rows = "poste;montant\nsalle;1200\nrepas;845,50\ntransport;310\n"
            msg.add_attachment(rows.encode(), maintype="text", subtype="csv",
                               filename="budget-été.csv")
        elif kind == 1:
            msg.add_attachment(_PDF, maintype="application", subtype="pdf",
                               filename="compte-rendu.pdf")
        else:
            msg.add_attachment(_PNG, maintype="image", subtype="png", filename="photo.png")
    return msg.as_bytes()


def dated_mail(rng: random.Random, folder: str, recent: int, old: int, now: datetime,
               owner: str = "demo@example.com") -> list[MaildirMessage]:
    """``recent`` messages within the last ~11 months and ``old`` ones 13 months to 3 years old."""
    out: list[MaildirMessage] = []
    for n in range(recent + old):
        if n < recent:
            when = now - timedelta(days=rng.uniform(0, 330), minutes=rng.randrange(1440))
        else:
            when = now - timedelta(days=rng.uniform(400, 1100))
        seen = folder == "Sent" or rng.random() < 0.6
        flags = [r"\Seen"] if seen else []
        if rng.random() < 0.05:
            flags.append(r"\Flagged")
        out.append((friendly_message(rng, folder, n, when.replace(microsecond=0), owner), when, flags))
    return out
