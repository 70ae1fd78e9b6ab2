"""The four services as separate processes sync a Dovecot mailbox holding the whole corpus."""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailferry.devkit import services
from mailferry.devkit.corpus import corpus_messages
from mailferry.devkit.dovecot import Dovecot

ENABLED = ("INBOX", "Sent", "Données/Été")
DISABLED = "Archive"


def _subject(raw: bytes) -> str | None:
    """The subject a reader sees, decoded by the standard library's modern header parser: an
    oracle independent of mailferry's parser, used where it is unambiguous (an ASCII header that
    parses without defects). The odd cases are pinned in tests/unit/test_mime.py instead."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    try:
        header = message["subject"]
    except Exception:
        return None
    if header is None or header.defects or not str(header).isprintable():
        return None
    source = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    if not source.isascii():
        return None
    return " ".join(str(header).split())


def _normal(value: object) -> object:
    return " ".join(value.split()) if isinstance(value, str) else value


def _fill(server: Dovecot) -> dict[tuple[str, int], dict[str, object]]:
    """Spread the corpus over the enabled folders (every third one \\Seen), add year-old mail to
    enabled folders and mail to a disabled one; return what the store must hold afterwards,
    read back from the server: (folder, uid) -> sha256 of BODY[], subject, seen."""
    now = datetime.now(UTC)
    old = now - timedelta(days=400)
    corpus = corpus_messages()
    expected: dict[tuple[str, int], dict[str, object]] = {}
    with server.session("alice") as imap:
        for folder in (*ENABLED[1:], DISABLED):
            imap.create_folder(folder)
        for i, (_, raw) in enumerate(corpus):
            folder = ENABLED[i % len(ENABLED)]
            flags = [b"\\Seen"] if i % 3 == 0 else []
            imap.append(folder, raw, flags=flags, msg_time=now - timedelta(days=i % 300))
        for folder in (ENABLED[0], ENABLED[2]):
            for j in range(3):
                imap.append(folder, f"Subject: old {j}\r\n\r\nold\r\n".encode(), msg_time=old)
        imap.append(DISABLED, b"Subject: archived\r\n\r\nnot synced\r\n", msg_time=now)
        for folder in ENABLED:
            imap.select_folder(folder, readonly=True)
            uids = imap.search(["SINCE", (now - timedelta(days=365)).date()])
            for uid, data in imap.fetch(uids, ["BODY.PEEK[]", "FLAGS"]).items():
                expected[(folder, uid)] = {
                    "sha256": hashlib.sha256(data[b"BODY[]"]).hexdigest(),
                    "subject": _subject(data[b"BODY[]"]),
                    "seen": b"\\Seen" in data[b"FLAGS"],
                }
    assert len(expected) == len(corpus), "every corpus message is within the year"
    return expected


@pytest.mark.parametrize(("fetchers", "persisters"), [(1, 1), (2, 2)])
def test_a_sync_stores_exactly_the_last_year_of_the_enabled_folders(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
    fetchers: int, persisters: int,
) -> None:
    with Dovecot(tmp_path / "dovecot") as server:
        server.add_user("alice", "secret")
        expected = _fill(server)

        assert services.run_cli(["user", "add", "--email", "alice@example.com"], env).returncode == 0
        added = services.run_cli(
            ["mailbox", "add", "--owner", "alice@example.com", "--host", server.host, "--port",
             str(server.port), "--security", "none", "--username", "alice", "--password-stdin",
             "--folders", ",".join(ENABLED)],
            env, stdin=b"secret\n",
        )
        assert added.returncode == 0, added.stderr
        mailbox_id = json.loads(added.stdout)["id"]

        processes.start("fetcher", fetchers)
        processes.start("persister", persisters)
        processes.start("notifier")
        synced = services.run_cli(["sync", "--mailbox", str(mailbox_id), "--wait",
                                   "--timeout", "90", "--json"], env)
        processes.assert_running()
        assert synced.returncode == 0, synced.stderr.decode() + processes.logs()
        # synced = stored; the subjects come with the persisters' parse step, right after
        services.wait_parsed(env["MAILFERRY_DATABASE_URL"], mailbox_id)

        listed = services.run_cli(["messages", "list", "--mailbox", str(mailbox_id), "--json"], env)
        assert listed.returncode == 0, listed.stderr
        stored = {(m["folder"], m["uid"]): m for m in json.loads(listed.stdout)}

    assert set(stored) == set(expected)
    wrong = [
        (key, field, got, want[field])
        for key, want in expected.items()
        for field in ("sha256", "seen", "subject")
        if want[field] is not None
        and (got := _normal(stored[key][field])) != want[field]
    ]
    assert wrong == []
