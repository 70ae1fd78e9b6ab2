"""Operator commands against the real broker and database: dead letters and key rotation."""

from __future__ import annotations

import json
import uuid

from cryptography.fernet import Fernet
from pydantic import SecretStr

from mailferry import db, messages, repository, topology
from mailferry.broker import ERROR_HEADER, Publisher, connect
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.devkit import services


def _dead_letter(settings: Settings, message: messages.SyncMailbox, reason: str) -> None:
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    publisher.publish_raw(messages.encode(message), exchange=topology.DEAD_LETTER.name,
                          routing_key=topology.FETCHER.name, type_=message.type,
                          headers={ERROR_HEADER: reason, "x-mailferry-attempt": 4})
    publisher.close()


def test_dead_letters_are_listed_with_their_reason_and_stay_put(
    env: dict[str, str], settings: Settings
) -> None:
    command = messages.SyncMailbox(run_id=uuid.uuid4(), mailbox_id=7)
    _dead_letter(settings, command, "retries exhausted; last error: RuntimeError: boom")
    for _ in range(2):  # listing twice shows the same: nothing was consumed
        result = services.run_cli(["dead-letters", "list", "--json"], env)
        assert result.returncode == 0, result.stderr
        [entry] = json.loads(result.stdout)
        assert entry["queue"] == topology.FETCHER.name
        assert (entry["type"], entry["mailbox_id"]) == ("SyncMailbox", 7)
        assert entry["error"] == "retries exhausted; last error: RuntimeError: boom"


def test_replayed_dead_letters_go_back_to_their_queue_with_a_fresh_budget(
    env: dict[str, str], settings: Settings
) -> None:
    command = messages.SyncMailbox(run_id=uuid.uuid4(), mailbox_id=7)
    _dead_letter(settings, command, "PermanentError: fixed since")
    result = services.run_cli(["dead-letters", "replay", "--queue", topology.FETCHER.name], env)
    assert json.loads(result.stdout) == {"replayed": 1}
    with connect(settings.broker_url) as conn:
        work = topology.FETCHER.queue()(conn.default_channel)
        replayed = work.get(no_ack=True)
        dead = topology.FETCHER.dead_letter_queue()(conn.default_channel).get(no_ack=True)
    assert replayed is not None and dead is None
    assert messages.decode(replayed.body) == command
    assert not any(k.startswith("x-mailferry") for k in (replayed.headers or {}))


def test_an_unknown_queue_is_a_usage_error(env: dict[str, str]) -> None:
    result = services.run_cli(["dead-letters", "list", "--queue", "nope"], env)
    assert result.returncode == 2
    assert "unknown queue" in result.stderr.decode()


def test_key_rotation_re_encrypts_every_password_with_the_new_key(
    env: dict[str, str], conn: db.Connection
) -> None:
    old = env["MAILFERRY_SECRET_KEY"]
    assert services.run_cli(["user", "add", "--email", "a@example.com"], env).returncode == 0
    for password in ("first", "sécond"):
        services.run_cli(["mailbox", "add", "--owner", "a@example.com", "--host", "imap.example.com",
                          "--port", "993", "--security", "ssl", "--username", "u",
                          "--password-stdin"], env, stdin=password.encode() + b"\n")
    new = Fernet.generate_key().decode()
    result = services.run_cli(["keys", "rotate"], {**env, "MAILFERRY_SECRET_KEY": f"{new},{old}"})
    assert json.loads(result.stdout) == {"rotated": 2}
    only_new = PasswordBox(SecretStr(new))
    passwords = [only_new.decrypt(m.password_encrypted)
                 for m in (repository.get_mailbox(conn, i) for i in (1, 2)) if m]
    assert passwords == ["first", "sécond"]


def test_a_dead_lettered_batch_of_mail_shows_its_json_part_and_replays_byte_for_byte(
    env: dict[str, str], settings: Settings
) -> None:
    raw = b"Subject: hi\r\n\r\n" + bytes(range(256))  # not text: the body must stay bytes
    event = messages.MessagesFetched(
        run_id=uuid.uuid4(), mailbox_id=9, lease_token=1, folder="INBOX", uidvalidity=5,
        batch_no=0, messages=(messages.FetchedMessage(uid=3, size=len(raw), raw=raw),))
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    publisher.publish_raw(messages.encode(event), exchange=topology.DEAD_LETTER.name,
                          routing_key=topology.PERSISTER.name, type_=event.type,
                          headers={ERROR_HEADER: "PermanentError: fixed since"},
                          content_type=messages.content_type(event))
    publisher.close()
    listed = services.run_cli(["dead-letters", "list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert (entry["type"], entry["mailbox_id"]) == ("MessagesFetched", 9)
    assert entry["note"] == f"+ {len(raw)} bytes of raw messages"
    assert json.loads(entry["json"])["messages"][0]["raw_length"] == len(raw)
    result = services.run_cli(["dead-letters", "replay", "--queue", topology.PERSISTER.name], env)
    assert json.loads(result.stdout) == {"replayed": 1}
    with connect(settings.broker_url) as conn:
        replayed = topology.PERSISTER.queue()(conn.default_channel).get(no_ack=True)
    assert replayed is not None
    assert replayed.content_type == messages.BLOBS_CONTENT_TYPE
    assert messages.decode(replayed.body) == event


def test_dead_letters_of_any_shape_are_listed_and_replayed_without_a_crash(
    env: dict[str, str], settings: Settings
) -> None:
    bodies = [b"[1, 2, 3]", b'"just a string"', b"42", b"null", b"[" * 100_000 + b"]" * 100_000,
              b'{"type": ["SyncMailbox"], "mailbox_id": {"deep": [1]}}', b"\xff\xfe not utf-8",
              b""]
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    for body in bodies:
        publisher.publish_raw(body, exchange=topology.DEAD_LETTER.name,
                              routing_key=topology.FETCHER.name, type_=None,
                              headers={ERROR_HEADER: "malformed message", "x-death": "odd"})
    publisher.close()
    listed = services.run_cli(["dead-letters", "list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    assert sorted(e["size"] for e in json.loads(listed.stdout)) == sorted(len(b) for b in bodies)
    table = services.run_cli(["dead-letters", "list"], env)
    assert table.returncode == 0 and b"Traceback" not in table.stderr, table.stderr
    replayed = services.run_cli(["dead-letters", "replay"], env)
    assert json.loads(replayed.stdout) == {"replayed": len(bodies)}
