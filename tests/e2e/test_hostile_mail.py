"""Hostile and broken mail synced through the whole pipeline (the services as processes, a real
Dovecot): every message is stored with exactly the bytes the server returned for BODY.PEEK[], its
problems are recorded in ``messages.parse_errors``, no worker crashes, nothing is dead-lettered,
and a normal message after the hostile ones in the same folder is stored too.

One sync of one mailbox carries every case (the suite stays fast); each test checks one guarantee
on the result. Two ways in, as the server would hold such mail:

* ``INBOX``: the cases go in by IMAP APPEND. Dovecot accepts all of them, but normalises line
  endings on APPEND (a bare CR or LF becomes CRLF).
* ``Raw``: the cases are written straight into the Maildir (``Dovecot.fill_maildir``), so the
  server serves bytes it never parsed: real NUL bytes on disk, bare CR, bare LF.

Dovecot never puts a NUL byte on the wire in BODY[] (it sends 0x80 instead, on both paths), so
real NUL bytes reaching the persister are covered one tier down, in tests/integration/test_persister.py
(``test_a_message_that_cannot_be_parsed_is_stored_with_its_exact_bytes``). The 40 MB attachment is
tests/e2e/test_operating.py (``test_a_40_mb_message_arrives_byte_for_byte_beside_small_ones``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from mailferry import db
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.topology import WORK_QUEUES

NORMAL = (b"X-Case: normal-after\r\nSubject: plain and simple\r\n"
          b"Message-ID: <normal@example.com>\r\n\r\nhi\r\n")


def _nested(depth: int) -> bytes:
    """``depth`` multiparts, each the only part of its parent, a text part at the bottom."""
    head = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth + 1)))
    return (b"X-Case: nested-200-levels\r\nSubject: turtles\r\nMessage-ID: <nested@example.com>\r\n"
            b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head
            + b"--b%d\r\nContent-Type: text/plain\r\n\r\nbottom\r\n" % depth + tail)


def _many_parts(count: int) -> bytes:
    parts = b"".join(b"--sep\r\nContent-Type: text/plain; name=p%d.txt\r\n\r\npart %d\r\n" % (i, i)
                     for i in range(count))
    return (b"X-Case: ten-thousand-parts\r\nSubject: parts\r\nMessage-ID: <parts@example.com>\r\n"
            b"Content-Type: multipart/mixed; boundary=sep\r\n\r\n" + parts + b"--sep--\r\n")


def _multipart(case: bytes, part_headers: bytes, body: bytes) -> bytes:
    return (b"X-Case: " + case + b"\r\nSubject: " + case + b"\r\nMessage-ID: <" + case
            + b"@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n"
            b"\r\n--zz\r\nContent-Type: text/plain\r\n\r\nintro\r\n--zz\r\n" + part_headers
            + b"\r\n\r\n" + body + b"\r\n--zz--\r\n")


@dataclass(frozen=True)
class Case:
    name: str
    folder: str  # INBOX: by APPEND; Raw: written into the Maildir
    raw: bytes
    errors: tuple[str, ...] = ()  # substrings the recorded parse errors must contain


CASES = [
    Case("nul-bytes", "Raw",
         b"X-Case: nul-bytes\r\nSubject: nul\x00here\r\nMessage-ID: <nul@example.com>\r\n\r\n"
         b"a body\x00with a NUL\r\n",
         ("header Subject: undeclared 8-bit text",)),
    Case("nul-bytes-appended", "INBOX",
         b"X-Case: nul-bytes-appended\r\nSubject: nul\x00here\r\nMessage-ID: <nul2@example.com>\r\n"
         b"\r\na body\x00with a NUL\r\n",
         ("header Subject: undeclared 8-bit text",)),
    Case("8bit-headers", "INBOX",
         b"X-Case: 8bit-headers\r\nSubject: caf\xc3\xa9 cr\xc3\xa8me\r\n"
         b"From: Bj\xf6rn \xff\xfe <bjorn@example.com>\r\nMessage-ID: <8bit@example.com>\r\n\r\nbody\r\n",
         ("header From: undeclared 8-bit text is not valid UTF-8",)),
    Case("invalid-utf8-headers", "Raw",
         b"X-Case: invalid-utf8-headers\r\nSubject: \xc3\x28 \xa0\xa1 \xf0\x28\x8c\x28\r\n"
         b"Message-ID: <badutf8@example.com>\r\n\r\nbody\r\n",
         ("header Subject: undeclared 8-bit text is not valid UTF-8",)),
    Case("broken-base64", "INBOX",
         _multipart(b"broken-base64", b"Content-Type: application/pdf; name=x.pdf\r\n"
                    b"Content-Transfer-Encoding: base64",
                    b"JVBERi0x!!!@@@###\r\nnot base64 at all=\r\nQUJD="),
         ("part 2: InvalidBase64",)),
    Case("broken-quoted-printable", "INBOX",
         _multipart(b"broken-quoted-printable", b"Content-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Transfer-Encoding: quoted-printable",
                    b"caf=C3=A9 =ZZ =E =\r\n=C3 end="),
         ("part 2: utf-8 text has invalid UTF-8 bytes",)),
    Case("unknown-charset", "INBOX",
         b"X-Case: unknown-charset\r\nSubject: =?x-unknown-42?q?hello?=\r\n"
         b"Message-ID: <charset@example.com>\r\nContent-Type: text/plain; charset=\"x-unknown-42\"\r\n"
         b"\r\nsome text \xe9\xe8\r\n",
         ("unknown charset 'x-unknown-42'",)),
    Case("lying-charset", "INBOX",
         b"X-Case: lying-charset\r\nSubject: liar\r\nMessage-ID: <liar@example.com>\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n\r\nLatin-1 pretending: \xe9t\xe9 \xe0 la plage\r\n",
         ("message: utf-8 text is not valid UTF-8; decoded as cp1252",)),
    Case("missing-message-id", "INBOX",
         b"X-Case: missing-message-id\r\nSubject: who am I\r\n\r\nno id\r\n",
         ("header Message-ID: missing or empty",)),
    Case("duplicate-message-id-1", "INBOX",
         b"X-Case: duplicate-message-id-1\r\nSubject: twin one\r\nMessage-ID: <twin@example.com>\r\n"
         b"\r\nfirst content\r\n"),
    Case("duplicate-message-id-2", "INBOX",
         b"X-Case: duplicate-message-id-2\r\nSubject: twin two\r\nMessage-ID: <twin@example.com>\r\n"
         b"\r\nsecond, different content\r\n"),
    Case("one-megabyte-header-line", "INBOX",
         b"X-Case: one-megabyte-header-line\r\nSubject: long\r\nMessage-ID: <long@example.com>\r\n"
         b"X-Long: " + b"x" * (1024 * 1024) + b"\r\n\r\nbody\r\n"),
    Case("eighty-thousand-headers", "INBOX",
         b"X-Case: eighty-thousand-headers\r\nSubject: many\r\nMessage-ID: <many@example.com>\r\n"
         + b"".join(b"X-H%05d: v\r\n" % i for i in range(80_000)) + b"\r\nbody\r\n"),
    Case("ten-thousand-parts", "INBOX", _many_parts(10_000)),
    Case("headers-only", "INBOX",
         b"X-Case: headers-only\r\nSubject: no body\r\nMessage-ID: <headers@example.com>\r\n"),
    Case("bare-lf", "Raw",
         b"X-Case: bare-lf\nSubject: unix\nMessage-ID: <lf@example.com>\n\nline one\nline two\n"),
    Case("bare-cr", "Raw",
         b"X-Case: bare-cr\r\nSubject: old mac\r\nMessage-ID: <cr@example.com>\r\n\r\n"
         b"line one\rline two\rline three\r\n"),
    Case("nested-200-levels", "INBOX", _nested(200)),
    Case("ten-kilobyte-encoded-word", "INBOX",
         b"X-Case: ten-kilobyte-encoded-word\r\nSubject: =?utf-8?b?"
         + base64.b64encode("é".encode() * 3800) + b"?=\r\nMessage-ID: <word@example.com>\r\n\r\nbody\r\n"),
]
FOLDERS = ("INBOX", "Raw")
_CASE = re.compile(rb"^X-Case: ([\w-]+)", re.MULTILINE)


@dataclass
class Synced:
    server_bytes: dict[str, bytes]  # case -> BODY[] as Dovecot returned it
    server_uids: dict[str, tuple[str, int]]  # case -> (folder, uid)
    stored: dict[tuple[str, int], dict[str, Any]]  # (folder, uid) -> messages list entry
    conn: db.Connection
    runs: list[dict[str, Any]]
    processes: services.ServiceProcesses
    vhost: str


def _fill(server: Dovecot) -> None:
    now = datetime.now(UTC)
    with server.session("eve") as imap:
        imap.create_folder("Raw")
        for case in CASES:
            if case.folder == "INBOX":
                imap.append("INBOX", case.raw)
    server.fill_maildir("eve", "Raw", [(c.raw, now, ()) for c in CASES if c.folder == "Raw"])
    with server.session("eve") as imap:  # after the hostile ones: the highest UID of each folder
        imap.select_folder("Raw", readonly=True)  # Dovecot assigns the Maildir files their UIDs
        assert len(imap.search("ALL")) == sum(1 for c in CASES if c.folder == "Raw")
        for folder in FOLDERS:
            imap.append(folder, NORMAL)


def _read_back(server: Dovecot) -> tuple[dict[str, bytes], dict[str, tuple[str, int]]]:
    """What Dovecot serves, keyed by the X-Case header (normal-after once per folder)."""
    data: dict[str, bytes] = {}
    where: dict[str, tuple[str, int]] = {}
    with server.session("eve") as imap:
        for folder in FOLDERS:
            imap.select_folder(folder, readonly=True)
            for uid, item in imap.fetch(imap.search("ALL"), ["BODY.PEEK[]"]).items():
                raw = item[b"BODY[]"]
                match = _CASE.search(raw)
                assert match is not None, raw[:200]
                name = match.group(1).decode()
                if name == "normal-after":
                    name = f"normal-after-{folder}"
                data[name] = raw
                where[name] = (folder, uid)
    return data, where


@pytest.fixture(scope="module")
def synced(migrated_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synced]:
    tmp = tmp_path_factory.mktemp("hostile")
    with services.private_database(template=migrated_template) as database_url, \
            services.private_vhost() as (vhost, broker_url), \
            Dovecot(tmp / "dovecot") as server, \
            db.connect(database_url, autocommit=True) as conn:
        env = services.deployment_env(database_url, broker_url, MAILFERRY_RETRY_DELAYS="1,2")
        server.add_user("eve", "pw")
        _fill(server)
        server_bytes, server_uids = _read_back(server)
        assert services.run_cli(["user", "add", "--email", "eve@example.com"], env).returncode == 0
        added = services.run_cli(
            ["mailbox", "add", "--owner", "eve@example.com", "--host", server.host, "--port",
             str(server.port), "--security", "none", "--username", "eve", "--password-stdin",
             "--folders", ",".join(FOLDERS)], env, stdin=b"pw\n")
        assert added.returncode == 0, added.stderr
        mailbox_id = json.loads(added.stdout)["id"]
        processes = services.ServiceProcesses(env, tmp)
        try:
            processes.start("fetcher")
            processes.start("persister")
            synced = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout",
                                       "180", "--json"], env)
            assert synced.returncode in (0, 1), synced.stderr.decode() + processes.logs()
            # parsed by the persister's parse step after it stored them: every message ends
            # parsed, its problems in parse_errors, and the step never stops on one
            services.wait_parsed(database_url, mailbox_id)
            listed = services.run_cli(["messages", "list", "--mailbox", str(mailbox_id), "--json"],
                                      env)
            assert listed.returncode == 0, listed.stderr
            stored = {(m["folder"], m["uid"]): m for m in json.loads(listed.stdout)}
            yield Synced(server_bytes, server_uids, stored, conn, json.loads(synced.stdout),
                         processes, vhost)
        finally:
            processes.stop()


def _row(synced: Synced, name: str) -> dict[str, Any]:
    entry = synced.stored.get(synced.server_uids[name])
    assert entry is not None, f"{name} was not stored"
    row = synced.conn.execute(
        """SELECT g.message_id, g.subject, g.parse_errors, r.data, r.size
             FROM messages g JOIN raw_messages r ON r.sha256 = g.sha256 WHERE g.id = %s""",
        (entry["id"],)).fetchone()
    assert row is not None
    return {**entry, **row}


def test_the_run_with_every_hostile_message_finishes_done_and_no_worker_crashed(
    synced: Synced,
) -> None:
    synced.processes.assert_running()
    assert [(r["status"], r["error"]) for r in synced.runs] == [("done", None)], \
        synced.processes.logs()
    assert synced.runs[0]["messages_stored"] == len(CASES) + len(FOLDERS)


def test_no_event_failed_even_once_and_nothing_was_dead_lettered(synced: Synced) -> None:
    for log in synced.processes.log_dir.glob("*.log"):
        text = log.read_text(errors="replace")
        assert "message.failed" not in text and "retry_scheduled" not in text, text[-4000:]
    for work in WORK_QUEUES:
        info = services.queue_info(synced.vhost, work.dead_letter_name)
        assert info.get("messages", 0) == 0, work.dead_letter_name


def test_the_persisters_index_every_hostile_message_for_search(synced: Synced) -> None:
    def waiting() -> int:
        row = synced.conn.execute("SELECT count(*) AS n FROM messages "
                                  "WHERE search_vector IS NULL OR search_head IS NULL").fetchone()
        return int(row["n"]) if row else -1

    assert services.eventually(lambda: waiting() == 0, timeout=60), synced.processes.logs()
    for log in synced.processes.log_dir.glob("*.log"):
        text = log.read_text(errors="replace")
        assert "search.index_failed" not in text and "parse.failed" not in text


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_each_hostile_message_is_stored_with_exactly_the_bytes_the_server_returned(
    synced: Synced, name: str,
) -> None:
    row = _row(synced, name)
    served = synced.server_bytes[name]
    assert hashlib.sha256(bytes(row["data"])).hexdigest() == hashlib.sha256(served).hexdigest()
    assert row["sha256"] == hashlib.sha256(served).hexdigest()
    assert row["size"] == len(served)


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_normal_message_after_the_hostile_ones_in_the_same_folder_is_stored_and_parsed(
    synced: Synced, folder: str,
) -> None:
    row = _row(synced, f"normal-after-{folder}")
    assert (row["subject"], row["message_id"], row["parse_errors"]) == (
        "plain and simple", "normal@example.com", [])
    assert bytes(row["data"]) == NORMAL
    others = [uid for (f, uid) in synced.server_uids.values() if f == folder]
    assert synced.server_uids[f"normal-after-{folder}"][1] == max(others)


@pytest.mark.parametrize("case", [c for c in CASES if c.errors], ids=lambda c: c.name)
def test_what_is_broken_in_a_message_is_recorded_in_its_parse_errors(
    synced: Synced, case: Case,
) -> None:
    errors = _row(synced, case.name)["parse_errors"]
    for expected in case.errors:
        assert any(expected in line for line in errors), (expected, errors)


def test_two_messages_sharing_a_message_id_with_different_content_are_two_messages(
    synced: Synced,
) -> None:
    one = _row(synced, "duplicate-message-id-1")
    two = _row(synced, "duplicate-message-id-2")
    assert one["message_id"] == two["message_id"] == "twin@example.com"
    assert one["id"] != two["id"]
    assert one["sha256"] != two["sha256"]
    assert (one["subject"], two["subject"]) == ("twin one", "twin two")


def test_a_message_without_message_id_is_stored_with_none(synced: Synced) -> None:
    assert _row(synced, "missing-message-id")["message_id"] is None


def test_headers_with_nul_bytes_and_invalid_utf8_are_stored_as_text_without_nul(
    synced: Synced,
) -> None:
    for name in ("nul-bytes", "nul-bytes-appended", "invalid-utf8-headers"):
        subject = _row(synced, name)["subject"]
        assert subject and "\x00" not in subject, (name, subject)
    assert _row(synced, "nul-bytes")["subject"].startswith("nul")


def test_raw_utf8_headers_are_decoded(synced: Synced) -> None:
    assert _row(synced, "8bit-headers")["subject"] == "café crème"


def test_a_ten_kilobyte_encoded_word_is_decoded_whole(synced: Synced) -> None:
    assert _row(synced, "ten-kilobyte-encoded-word")["subject"] == "é" * 3800


def test_ten_thousand_parts_are_ten_thousand_attachments(synced: Synced) -> None:
    entry = _row(synced, "ten-thousand-parts")
    row = synced.conn.execute("SELECT jsonb_array_length(attachments) AS n FROM messages "
                              "WHERE id = %s", (entry["id"],)).fetchone()
    assert row == {"n": 10_000}


def test_a_message_nested_200_levels_deep_keeps_its_headers(synced: Synced) -> None:
    row = _row(synced, "nested-200-levels")
    assert (row["subject"], row["message_id"]) == ("turtles", "nested@example.com")
    body = synced.conn.execute("SELECT body_text FROM messages WHERE id = %s",
                               (row["id"],)).fetchone()
    assert body == {"body_text": "bottom\r\n"}


def test_the_maildir_path_serves_bytes_imap_append_would_have_normalised(synced: Synced) -> None:
    """A check of this suite's own set-up: the Raw folder really hands the pipeline a bare CR."""
    assert synced.server_uids["bare-cr"][0] == "Raw"
    assert b"line one\rline two\r" in synced.server_bytes["bare-cr"]


@pytest.mark.parametrize("name", ["one-megabyte-header-line", "eighty-thousand-headers",
                                  "ten-thousand-parts", "headers-only", "bare-lf",
                                  "nested-200-levels", "ten-kilobyte-encoded-word",
                                  "duplicate-message-id-1", "duplicate-message-id-2"])
def test_a_message_that_is_extreme_but_well_formed_records_no_parse_error(
    synced: Synced, name: str,
) -> None:
    assert _row(synced, name)["parse_errors"] == []
