"""Every service serves Prometheus metrics, and after a sync they say exactly what happened."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from mailferry import app, db, topology
from mailferry.broker import Publisher
from mailferry.crypto import PasswordBox
from mailferry.devkit import services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.faults import sql

MESSAGES = 12
SERVICES = ("scheduler", "fetcher", "persister", "notifier")


def add_mailbox(conn: db.Connection, env: dict[str, str], host: str, port: int, owner: str,
                password: str, username: str = "alice") -> int:
    """A mailbox of ``owner`` syncing INBOX, added in-process (no CLI start-up to wait for)."""
    app.add_user(conn, owner)
    return app.add_mailbox(conn, PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"])),
                           owner_email=owner, host=host, port=port, security="none",
                           username=username, password=password, folders=["INBOX"])


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample a process serves: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def families(port: int) -> set[str] | None:
    """The metric names a process serves, or None while nothing listens there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return {f.name for f in text_string_to_metric_families(answer.read().decode())}
    except OSError:
        return None


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nobody listens on."""
    while True:
        first = services.free_port()
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_after_a_sync_every_services_counters_moved_by_what_happened(
    env: dict[str, str], processes: services.ServiceProcesses, tmp_path: Path,
    database_url: str, conn: db.Connection,
) -> None:
    ports = {service: services.free_port() for service in SERVICES}
    with Dovecot(tmp_path / "dovecot") as server:
        server.add_user("alice", "secret")
        raw = [f"Subject: metrics {n}\r\nMessage-ID: <m{n}@metrics.test>\r\n\r\n{'x' * 100 * n}\r\n"
               .encode() for n in range(MESSAGES)]
        with server.session("alice") as imap:
            for message in raw:
                imap.append("INBOX", message)
        good, bad = (add_mailbox(conn, env, server.host, server.port, email, password)
                     for email, password in (("alice@example.com", "secret"),
                                             ("bob@example.com", "wrong")))
        realtime = {"MAILFERRY_REALTIME": "1"}
        for service in SERVICES:
            processes.start(service, env={"MAILFERRY_METRICS_PORT": str(ports[service]),
                                          **realtime})
        # the scheduler queues both mailboxes (new mailboxes are due): one syncs, one is refused
        assert services.eventually(lambda: sql(database_url, """
            SELECT count(*) AS n FROM sync_runs WHERE status NOT IN ('queued', 'running')""")
            [0]["n"] == 2, timeout=60), processes.logs()
        runs = {r["mailbox_id"]: r for r in sql(database_url, "SELECT * FROM sync_runs")}
        assert (runs[good]["status"], runs[bad]["error_kind"]) == ("done", "auth")
        # to each service, one message it cannot read: each dead-letters it at once
        publisher = Publisher(env["MAILFERRY_BROKER_URL"], (1.0,))
        for work in topology.WORK_QUEUES:
            publisher.publish_raw(b"not json", exchange="", routing_key=work.name,
                                  type_="Nonsense")
        publisher.close()

        fetcher = services.eventually(
            lambda: (s if value(s := scrape(ports["fetcher"]),
                                "mailferry_dead_lettered_messages_total",
                                queue=topology.FETCHER.name) == 1 else None))
        assert fetcher, processes.logs()
        assert value(fetcher, "mailferry_fetcher_syncs_total", outcome="done", error_kind="") == 1
        assert value(fetcher, "mailferry_fetcher_syncs_total", outcome="failed",
                     error_kind="auth") == 1
        assert value(fetcher, "mailferry_fetcher_sync_duration_seconds_count") == 2
        assert value(fetcher, "mailferry_fetcher_messages_fetched_total") == MESSAGES
        assert value(fetcher, "mailferry_fetcher_bytes_fetched_total") == sum(map(len, raw))
        assert value(fetcher, "mailferry_fetcher_imap_connections") == 0

        scheduler = scrape(ports["scheduler"])
        assert value(scheduler, "mailferry_runs_requested_total", reason="scheduler") == 2
        assert value(scheduler, "mailferry_scheduler_due_mailboxes") == 0
        assert value(scheduler, "mailferry_enabled_mailboxes") == 2
        assert value(scheduler, "mailferry_mailboxes_never_synced") == 1  # the refused one
        assert 0 <= value(scheduler, "mailferry_sync_lag_seconds", quantile="1.0") < 60

        persister = services.eventually(
            lambda: (s if value(s := scrape(ports["persister"]),
                                "mailferry_dead_lettered_messages_total",
                                queue=topology.PERSISTER.name) == 1 else None))
        assert persister, processes.logs()
        batches = sql(database_url, "SELECT count(*) AS n FROM sync_batches")[0]["n"]
        assert value(persister, "mailferry_persister_events_total", type="MessagesFetched",
                     outcome="applied") == batches
        assert value(persister, "mailferry_persister_events_total", type="SyncFailed",
                     outcome="applied") == 1
        assert value(persister, "mailferry_persister_event_duration_seconds_count",
                     type="MessagesFetched") == batches
        assert value(persister, "mailferry_persister_messages_stored_total") == MESSAGES
        assert value(persister, "mailferry_persister_bytes_stored_total") == sum(map(len, raw))
        assert value(persister, "mailferry_persister_search_backlog") <= MESSAGES

        notifier = services.eventually(
            lambda: (s if (value(s := scrape(ports["notifier"]),
                                 "mailferry_notifier_notifications_total", channel="realtime",
                                 outcome="sent"),
                           value(s, "mailferry_dead_lettered_messages_total",
                                 queue=topology.NOTIFIER.name)) == (1, 1) else None))
        assert notifier, processes.logs()

        stored = sql(database_url, "SELECT encode(sha256, 'hex') AS h FROM messages")
        assert {r["h"] for r in stored} == {hashlib.sha256(m).hexdigest() for m in raw}
        # `mailferry status` carries the same lag summary
        status = json.loads(services.run_cli(["status", "--json"], env).stdout)
        assert (status["sync_lag"]["mailboxes"], status["sync_lag"]["never_synced"]) == (2, 1)


def test_mailferry_up_gives_its_children_consecutive_metrics_ports_in_a_fixed_order(
    env: dict[str, str], tmp_path: Path,
) -> None:
    first = free_ports(5)
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [sys.executable, "-m", "mailferry.services.cli.main", "up", "--fetchers", "2"],
        env={**os.environ, **env, "MAILFERRY_METRICS_PORT": str(first)},
        stdout=log, stderr=subprocess.STDOUT, cwd=services.REPO)
    try:
        served = services.eventually(
            lambda: (names if all(names := [families(first + i) for i in range(5)]) else None),
            timeout=90, interval=0.5)
        assert served, (tmp_path / "up.log").read_text()
        scheduler, fetcher1, fetcher2, persister, notifier = served
        assert "mailferry_sync_lag_seconds" in scheduler
        assert "mailferry_fetcher_syncs" in fetcher1 and "mailferry_fetcher_syncs" in fetcher2
        assert "mailferry_persister_events" in persister
        assert "mailferry_notifier_notifications" in notifier
        # each serves its own metrics and the common ones, not the other services'
        assert "mailferry_fetcher_syncs" not in persister | notifier | scheduler
        assert all("mailferry_dead_lettered_messages" in names for names in served)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
        log.close()
