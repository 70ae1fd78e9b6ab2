"""The integrator's examples (examples/, pika only, no mailferry import) against the real
services, RabbitMQ and Dovecot: request_sync.py starts syncs as a third-party application would,
and consume_changes.py prints the new mail, never the old mail of the first sync."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailferry.devkit import faults, services
from mailferry.devkit.dovecot import Dovecot

EXAMPLES = services.REPO / "examples"
USER, PASSWORD = "alice", "secret"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        dovecot.add_user(USER, PASSWORD)
        yield dovecot


def _example(name: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name), *args]


def _request_sync(url: str, mailbox_id: int) -> str:
    out = subprocess.run(_example("request_sync.py", "--url", url, "--mailbox", str(mailbox_id)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["run_id"])


def _consuming(vhost: str, queue: str) -> bool:
    try:
        return int(services.queue_info(vhost, queue).get("consumers", 0)) > 0  # type: ignore[call-overload]
    except OSError:  # not declared yet (HTTP 404)
        return False


def test_the_examples_start_syncs_and_print_only_the_mail_that_is_new(
    server: Dovecot, env: dict[str, str], database_url: str, vhost: tuple[str, str],
    processes: services.ServiceProcesses,
) -> None:
    faults.fill(server, USER, "INBOX", range(30), random.Random(7))
    mailbox_id = faults.add_mailbox(env, server.host, server.port, USER, PASSWORD, ["INBOX"])
    processes.start("fetcher")
    processes.start("persister")
    url = env["MAILFERRY_BROKER_URL"]
    consumer = subprocess.Popen(_example("consume_changes.py", "--url", url, "--mailbox",
                                         str(mailbox_id)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[str] = []
    assert services.eventually(lambda: _consuming(vhost[0], "mailferry.fetcher.sync-mailbox"))
    try:
        assert consumer.stderr is not None and "waiting" in consumer.stderr.readline()
        threading.Thread(target=lambda: printed.extend(consumer.stdout or ()), daemon=True).start()

        first = _request_sync(url, mailbox_id)
        assert faults.wait_for_run(database_url, first, processes)["status"] == "done"
        server.append(USER, None, "INBOX", b"From: bob@example.com\r\nSubject: Fresh news\r\n\r\nhi\r\n")
        second = _request_sync(url, mailbox_id)
        assert faults.wait_for_run(database_url, second, processes)["status"] == "done"
        services.eventually(lambda: printed, timeout=30)
        run = faults.run_row(database_url, first)
    finally:
        consumer.terminate()
        consumer.wait(timeout=10)

    assert run["requested_by"] == "example-app"
    assert len(printed) == 1, printed  # the 30 messages of the first sync are not new mail
    assert '"Fresh news" from bob@example.com' in printed[0]
