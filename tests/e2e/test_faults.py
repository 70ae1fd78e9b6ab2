"""Faults injected into the real services (separate processes, real RabbitMQ, PostgreSQL and
Dovecot, no mocks); after each, the store equals the server: per folder, the same set of
(uid, sha256 of the raw bytes, flags), no message lost, none stored twice (DESIGN invariants 1,
2, 3, 5 and 7).

- processes killed with SIGKILL at random moments of a 5,000-message sync, several rounds;
- every broker connection closed mid-sync (RabbitMQ's management API);
- every PostgreSQL session terminated mid-sync (``pg_terminate_backend``);
- the IMAP connection reset mid-FETCH (a TCP proxy between the fetcher and Dovecot);
- a poison event: dead-lettered with its reason, the rest of the mailbox stored;
- a fetcher frozen past its lease (SIGSTOP) while another takes over: its writes are refused;
- SIGTERM to a fetcher and a persister mid-work: they finish what they hold and exit cleanly.

Running it::

    .venv/bin/pytest -q tests/e2e/test_faults.py                       # 3 crash rounds
    MAILFERRY_CRASH_ROUNDS=20 .venv/bin/pytest -q tests/e2e/test_faults.py
    .venv/bin/pytest -q -m slow tests/e2e/test_faults.py               # the long profile (15)

The random choices (moments, victims, server changes) come from ``MAILFERRY_FAULT_SEED``
(random when unset; a failing test prints the seed it used).
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.messaging import Producer

from mailferry.devkit import faults, mail, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.tcp_proxy import TcpProxy

USER, PASSWORD = "alice", "secret"
FOLDERS = ("INBOX", "Work")
CRASH_ROUNDS = int(os.environ.get("MAILFERRY_CRASH_ROUNDS", "3"))
LONG_CRASH_ROUNDS = 15
SEED = int(os.environ.get("MAILFERRY_FAULT_SEED") or random.randrange(1 << 30))
PERSISTER_QUEUE = "mailferry.persister.events"

# A short lease, so that a killed fetcher's mailbox is taken over within seconds, and retry
# delays that outlast it (a command meeting a live lease is retried, never dropped); small
# batches, so that a kill lands between many events.
FAULT_ENV = {
    "MAILFERRY_LEASE_SECONDS": "4",
    "MAILFERRY_RETRY_DELAYS": "1,1,2,2,3,3,5,5,8",
    "MAILFERRY_BATCH_MAX_MESSAGES": "100",
    "MAILFERRY_IMAP_TIMEOUT": "60",
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Dovecot]:
    with Dovecot(tmp_path / "dovecot") as dovecot:
        dovecot.add_user(USER, PASSWORD)
        yield dovecot


@pytest.fixture
def fenv(env: dict[str, str]) -> dict[str, str]:
    return {**env, **FAULT_ENV}


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def procs(fenv: dict[str, str], log_dir: Path) -> Iterator[services.ServiceProcesses]:
    processes = services.ServiceProcesses(fenv, log_dir)
    yield processes
    for _, process in processes.processes:  # a frozen process cannot handle SIGTERM
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
    processes.stop()


def _mailbox(server: Dovecot, env: dict[str, str], port: int | None = None) -> int:
    return faults.add_mailbox(env, server.host, port or server.port, USER, PASSWORD, FOLDERS)


def _done(run: dict[str, object], procs: services.ServiceProcesses) -> None:
    assert run["status"] == "done", f"seed {SEED}: run ended {run}\n{procs.logs()}"


def _stored(database_url: str, run_id: str) -> int:
    return int(faults.run_row(database_url, run_id)["messages_stored"])


def _ended(database_url: str, run_id: str) -> bool:
    return faults.run_row(database_url, run_id)["status"] not in ("queued", "running")


def _progress(database_url: str, run_id: str, stored: int) -> None:
    """Wait until the run stored ``stored`` messages (or ended): a point in the middle of it."""
    def reached() -> bool:
        return _stored(database_url, run_id) >= stored or _ended(database_url, run_id)
    services.eventually(reached, timeout=120)


def _change_server(server: Dovecot, rng: random.Random, first: int, new: int) -> None:
    """Mail arrives, is read, flagged, moved and expunged between two syncs."""
    with server.session(USER) as imap:
        imap.select_folder("INBOX")
        uids = imap.search("ALL")
        picked = rng.sample(uids, min(len(uids), 120))
        imap.add_flags(picked[:40], [b"\\Seen"])
        imap.add_flags(picked[40:60], [b"\\Flagged", b"$Later"])
        imap.remove_flags(picked[60:80], [b"\\Seen"])
        imap.move(picked[80:90], "Work")
        imap.delete_messages(picked[90:110])
        imap.expunge()
    half = new // 2
    faults.fill(server, USER, "INBOX", range(first, first + half), rng)
    faults.fill(server, USER, "Work", range(first + half, first + new), rng, flags=["\\Seen"])


# -- 1. crashes ---------------------------------------------------------------------------------


def _crash_rounds(rounds: int, server: Dovecot, fenv: dict[str, str], database_url: str,
                  procs: services.ServiceProcesses) -> None:
    rng = random.Random(SEED)
    print(f"MAILFERRY_FAULT_SEED={SEED}")
    faults.fill(server, USER, "INBOX", range(4000), rng)
    faults.fill(server, USER, "Work", range(4000, 5000), rng, flags=["\\Seen"])
    mailbox_id = _mailbox(server, fenv)
    procs.start("fetcher", 2)
    procs.start("persister", 2)
    next_number, held = 5000, 5000
    for round_no in range(rounds):
        # Round 0 is the first sync of 5,000 messages; then odd rounds re-scan the whole window
        # (--force: everything fetched again, the store keeps one copy), even ones are
        # incremental after changes on the server (600 new, flags, moves, expunges).
        force = round_no % 2 == 1
        if round_no and not force:
            _change_server(server, rng, next_number, 600)
            next_number += 600
        fetched = held if round_no == 0 or force else 600
        run_id = faults.request_sync(fenv, mailbox_id, force=force)
        for _ in range(rng.randint(1, 2)):
            service = rng.choice(("fetcher", "persister"))
            if service == "fetcher":  # fetchers are quick: a moment early in the run
                time.sleep(rng.uniform(0.0, 1.5))
            else:  # persisters take longer: a random point of the storing
                _progress(database_url, run_id, int(rng.uniform(0.0, 0.9) * fetched))
            faults.kill9(rng.choice(faults.alive(procs, service)))
            procs.start(service)  # the replacement, as a supervisor would start it
            print(f"round {round_no}: killed a {service} at "
                  f"{_stored(database_url, run_id)}/{fetched} stored")
        _done(faults.wait_for_run(database_url, run_id, procs), procs)
        held = faults.assert_store_equals_server(server, USER, database_url, mailbox_id, FOLDERS)
        assert held >= 5000


@pytest.mark.early
@pytest.mark.timeout(120 + 60 * CRASH_ROUNDS)
def test_killing_fetchers_and_persisters_at_random_moments_loses_and_duplicates_nothing(
    server: Dovecot, fenv: dict[str, str], database_url: str,
    procs: services.ServiceProcesses,
) -> None:
    _crash_rounds(CRASH_ROUNDS, server, fenv, database_url, procs)


@pytest.mark.slow
@pytest.mark.timeout(120 + 60 * max(CRASH_ROUNDS, LONG_CRASH_ROUNDS))
def test_killing_fetchers_and_persisters_at_random_moments_loses_and_duplicates_nothing_long(
    server: Dovecot, fenv: dict[str, str], database_url: str,
    procs: services.ServiceProcesses,
) -> None:
    _crash_rounds(max(CRASH_ROUNDS, LONG_CRASH_ROUNDS), server, fenv, database_url, procs)


# -- 2. the broker drops its connections --------------------------------------------------------


def test_a_sync_completes_exactly_when_the_broker_closes_every_connection_mid_sync(
    server: Dovecot, fenv: dict[str, str], database_url: str, vhost: tuple[str, str],
    procs: services.ServiceProcesses,
) -> None:
    rng = random.Random(SEED)
    faults.fill(server, USER, "INBOX", range(2500), rng)
    mailbox_id = _mailbox(server, fenv)
    procs.start("fetcher", 2)
    procs.start("persister", 2)

    gone: set[str] = set()

    def consumers_connected() -> bool:
        # The management API lists a connection a few seconds after it opened (or closed).
        return len([c for c in faults.broker_connections(vhost[0]) if c["name"] not in gone]) >= 4

    assert services.eventually(consumers_connected, timeout=60)
    run_id = faults.request_sync(fenv, mailbox_id)
    closed = []
    for threshold in (1, 1200):  # while the fetcher fetches, then while persisters store
        _progress(database_url, run_id, threshold)
        names = {c["name"] for c in faults.broker_connections(vhost[0])} - gone
        closed.append(faults.close_broker_connections(vhost[0]))
        gone |= names
        assert services.eventually(consumers_connected, timeout=60), procs.logs()
    assert all(closed), f"no connection to close: {closed}"

    _done(faults.wait_for_run(database_url, run_id, procs), procs)
    procs.assert_running()
    assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                             FOLDERS) == 2500
    # The services reconnected: a second sync still works.
    _done(faults.wait_for_run(database_url, faults.request_sync(fenv, mailbox_id), procs), procs)


# -- 3. PostgreSQL drops its sessions -----------------------------------------------------------


def test_a_sync_completes_exactly_when_postgresql_terminates_every_session_mid_sync(
    server: Dovecot, fenv: dict[str, str], database_url: str,
    procs: services.ServiceProcesses, log_dir: Path,
) -> None:
    rng = random.Random(SEED)
    faults.fill(server, USER, "INBOX", range(2500), rng)
    mailbox_id = _mailbox(server, fenv)
    procs.start("fetcher")
    procs.start("persister", 2)
    run_id = faults.request_sync(fenv, mailbox_id)

    terminated = []
    for threshold in (1, 800, 1600):
        _progress(database_url, run_id, threshold)
        terminated.append(faults.terminate_backends(database_url))
    assert terminated[0] > 0, terminated

    _done(faults.wait_for_run(database_url, run_id, procs), procs)
    procs.assert_running()
    # The fetcher's attempt lost its session too, after it had published every event: that
    # attempt still counts (it is not failed and redone under a new lease).
    tokens = faults.sql(database_url, "SELECT lease_token FROM mailboxes WHERE id = %s",
                        (mailbox_id,))
    assert tokens == [{"lease_token": 1}], f"the sync was fetched again: {tokens}"
    failed = [line for line in faults.log_lines(log_dir, "fetcher")
              if line.get("event") == "message.failed"]
    assert not failed, f"the fetcher's attempt was failed for a lost session: {failed}"
    assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                             FOLDERS) == 2500


# -- 4. the IMAP connection is reset mid-FETCH ---------------------------------------------------


def test_an_imap_connection_reset_mid_fetch_is_retried_and_the_sync_completes(
    server: Dovecot, fenv: dict[str, str], database_url: str,
    procs: services.ServiceProcesses,
) -> None:
    rng = random.Random(SEED)
    faults.fill(server, USER, "INBOX", range(2000), rng)
    faults.fill(server, USER, "Work", range(2000, 2500), rng)
    with TcpProxy(server.host, server.port) as proxy:
        mailbox_id = _mailbox(server, fenv, port=proxy.port)
        procs.start("fetcher")
        procs.start("persister")
        # About 6 MB of bodies: the cut lands in the FETCH BODY.PEEK[] of INBOX.
        proxy.cut_after(2_500_000)
        run_id = faults.request_sync(fenv, mailbox_id)
        assert proxy.cut_done.wait(120), "the proxy never saw 2.5 MB go through"
        run = faults.wait_for_run(database_url, run_id, procs)
        assert proxy.cuts == 1 and proxy.accepted >= 2, (proxy.cuts, proxy.accepted, run)
    _done(run, procs)
    assert run["attempts"] >= 1, run  # the attempt cut short is recorded on the run
    assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                             FOLDERS) == 2500


# -- 5. poison events ---------------------------------------------------------------------------


def _publish(broker_url: str, body: bytes, type_: str) -> None:
    """Straight onto the events exchange, as a buggy or foreign producer would."""
    with Connection(broker_url, transport_options={"confirm_publish": True}) as conn:
        Producer(conn.default_channel).publish(
            body, exchange=Exchange("mailferry.events", type="topic", durable=True),
            routing_key="messages.fetched", type=type_, headers={"schema-version": 1},
            content_type="application/json", content_encoding="utf-8", delivery_mode=2,
            declare=[])


def test_poison_events_are_dead_lettered_with_their_reason_and_the_mailbox_still_syncs(
    server: Dovecot, env: dict[str, str], database_url: str, vhost: tuple[str, str],
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    faults.fill(server, USER, "INBOX", range(600), rng)
    faults.fill(server, USER, "Work", range(600, 800), rng)
    mailbox_id = _mailbox(server, env)
    procs = services.ServiceProcesses(env, tmp_path)  # conftest's short retry delays: 1,2,4
    try:
        procs.start("fetcher")
        run_id = faults.request_sync(env, mailbox_id)
        services.eventually(lambda: faults.queue_depth(vhost[0], PERSISTER_QUEUE) >= 3,
                            timeout=60)
        token = faults.sql(database_url, "SELECT lease_token FROM mailboxes WHERE id = %s",
                           (mailbox_id,))[0]["lease_token"]
        # Malformed: not a message of any known schema (a producer of another version).
        _publish(vhost[1], json.dumps({"type": "MessagesFetched", "mailbox_id": mailbox_id,
                                       "run_id": run_id, "batch": "?"}).encode(),
                 "MessagesFetched")
        # Well-formed, in this very run, but the database refuses it every time: a server that
        # announced a UIDVALIDITY beyond 64 bits (RFC 3501 allows 32).
        raw = mail.plain_message(99999, rng)
        poison = {
            "type": "MessagesFetched", "version": 1, "run_id": run_id, "mailbox_id": mailbox_id,
            "lease_token": token, "folder": "INBOX", "uidvalidity": 2**64, "batch_no": 999,
            "messages": [{"uid": 99999, "flags": [], "size": len(raw),
                          "raw": base64.b64encode(raw).decode()}],
        }
        _publish(vhost[1], json.dumps(poison).encode(), "MessagesFetched")
        procs.start("persister")
        run = faults.wait_for_run(database_url, run_id, procs, timeout=120)

        def dead_letters() -> list[dict[str, object]]:
            listed = services.run_cli(["dead-letters", "list", "--queue", PERSISTER_QUEUE,
                                       "--json"], env)
            assert listed.returncode == 0, listed.stderr
            found: list[dict[str, object]] = json.loads(listed.stdout)
            return found if len(found) >= 2 else []

        found = services.eventually(dead_letters, timeout=60, interval=1)
        assert len(found) == 2, found
        [malformed] = [d for d in found if str(d["error"]).startswith("malformed message")]
        [refused] = [d for d in found if d is not malformed]
        # what the database cannot hold fails alike every time: dead-lettered at once
        assert str(refused["error"]).startswith(
            "PermanentError: the database refuses this event:"), found
        assert "out of range" in str(refused["error"]), found
        assert refused["run_id"] == run_id and refused["attempts"] == 0, found
        # Everything else of the mailbox is stored, byte for byte.
        assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                                 FOLDERS) == 800
        assert faults.sql(database_url,
                          "SELECT count(*) AS n FROM message_folders WHERE uid = 99999"
                          ) == [{"n": 0}]
        # The poison did not hold the run up. If it was dead-lettered before the run ended,
        # the run says an event was lost (and its checkpoints did not move); either way the
        # next run completes the mailbox.
        assert run["status"] == "done" or "not stored" in str(run["error"]), run
        rerun = faults.wait_for_run(database_url, faults.request_sync(env, mailbox_id), procs)
        _done(rerun, procs)
        procs.assert_running()
    finally:
        procs.stop()


# -- 6. fencing ---------------------------------------------------------------------------------


def test_a_fetcher_frozen_past_its_lease_cannot_write_over_the_fetcher_that_took_over(
    server: Dovecot, fenv: dict[str, str], database_url: str, vhost: tuple[str, str],
    procs: services.ServiceProcesses, log_dir: Path,
) -> None:
    rng = random.Random(SEED)
    faults.fill(server, USER, "INBOX", range(1500), rng)
    with TcpProxy(server.host, server.port) as proxy:
        mailbox_id = _mailbox(server, fenv, port=proxy.port)
        # Fetcher A stalls in the middle of its FETCH (the proxy holds the server's bytes)...
        proxy.pause_after(1_500_000)
        procs.start("fetcher")
        procs.start("persister")
        run_id = faults.request_sync(fenv, mailbox_id)
        assert proxy.paused.wait(120), "fetcher A never got 1.5 MB"
        # ...after its first batches are stored by the persister,
        services.eventually(lambda: faults.queue_depth(vhost[0], PERSISTER_QUEUE) == 0
                            and _stored(database_url, run_id) > 0, timeout=120)
        stored_by_a = _stored(database_url, run_id)
        # and publishes a few more that nobody stores yet.
        persister = faults.alive(procs, "persister")[0]
        persister.send_signal(signal.SIGTERM)
        persister.wait(timeout=60)
        queued_before = faults.queue_depth(vhost[0], PERSISTER_QUEUE)
        proxy.pause_after(700_000)
        proxy.resume()
        assert proxy.paused.wait(60)
        assert services.eventually(
            lambda: faults.queue_depth(vhost[0], PERSISTER_QUEUE) > queued_before, timeout=30)
        fetcher_a = faults.alive(procs, "fetcher")[0]
        token_a = faults.sql(database_url, "SELECT lease_token FROM mailboxes WHERE id = %s",
                             (mailbox_id,))[0]["lease_token"]
        # Now A freezes (a stop-the-world pause, a VM migration), with the lease in hand.
        fetcher_a.send_signal(signal.SIGSTOP)
        try:
            # The user reads and flags every message meanwhile, those already stored included:
            # anything of A's applied from now on would show its older flags.
            with server.session(USER) as imap:
                imap.select_folder("INBOX")
                imap.add_flags("1:*", [b"\\Seen", b"\\Flagged"], silent=True)
            # The broker loses A (as after consumer_timeout or a partition): its command goes
            # to fetcher B, which waits out A's lease, takes over and syncs the whole run.
            assert faults.close_broker_connections(vhost[0], pid=fetcher_a.pid) >= 1
            procs.start("fetcher")
            assert services.eventually(lambda: faults.sql(
                database_url, "SELECT lease_token FROM mailboxes WHERE id = %s",
                (mailbox_id,))[0]["lease_token"] > token_a, timeout=60), \
                f"B never took the lease\n{procs.logs()}"
            procs.start("persister")
            run = faults.wait_for_run(database_url, run_id, procs, timeout=120)
            _done(run, procs)
            assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                                     FOLDERS) == 1500
            fenced = [line for line in faults.log_lines(log_dir, "persister")
                      if line.get("event") == "event.fenced"
                      and line.get("lease_token") == token_a]
            assert fenced, "A's events queued before the takeover were not refused"
        finally:
            # A wakes up: whatever it still writes is refused, then it notices and stops.
            fetcher_a.send_signal(signal.SIGCONT)
            proxy.resume()
        # A's own log: its attempt ends (the lease was lost, or its last events were refused).
        assert services.eventually(
            lambda: any(line.get("event") in ("lease.lost", "message.retry_scheduled",
                                              "sync.fetched")
                        for line in faults.log_lines(log_dir, "fetcher-0")),
            timeout=60), procs.logs()
        time.sleep(2)  # let anything A still publishes reach the persister
        assert stored_by_a > 0
        assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                                 FOLDERS) == 1500
        # A is still a working fetcher, and the next run needs no correction.
        rerun = faults.wait_for_run(database_url, faults.request_sync(fenv, mailbox_id), procs)
        _done(rerun, procs)
        assert rerun["messages_stored"] == 0, rerun
        exited = [(n, p.returncode) for n, p in procs.processes
                  if p is not persister and p.poll() is not None]
        assert not exited, f"services exited: {exited}\n{procs.logs()}"


# -- 7. graceful stop ---------------------------------------------------------------------------


def test_sigterm_mid_sync_stops_a_fetcher_and_a_persister_without_half_applied_work(
    server: Dovecot, fenv: dict[str, str], database_url: str,
    procs: services.ServiceProcesses, log_dir: Path,
) -> None:
    rng = random.Random(SEED)
    faults.fill(server, USER, "INBOX", range(2500), rng)
    with TcpProxy(server.host, server.port) as proxy:
        mailbox_id = _mailbox(server, fenv, port=proxy.port)
        proxy.pause_after(3_000_000)  # the fetcher is held in the middle of its FETCH
        procs.start("fetcher")
        procs.start("persister")
        run_id = faults.request_sync(fenv, mailbox_id)
        assert proxy.paused.wait(120), "the fetcher never got 3 MB"
        services.eventually(lambda: _stored(database_url, run_id) >= 100, timeout=120)
        stopping = [p for name, p in procs.processes if name in ("fetcher", "persister")]
        for process in stopping:
            process.send_signal(signal.SIGTERM)
        time.sleep(1)  # the signals are handled while the fetcher waits for the server
        proxy.resume()
        for process in stopping:
            assert process.wait(timeout=120) == 0, procs.logs()
    events = {service: [line.get("event") for line in faults.log_lines(log_dir, service)]
              for service in ("fetcher-0", "persister-0")}
    for service, logged in events.items():
        assert logged.count("worker.stopping") == 1 and logged[-1] == "worker.stopped", \
            (service, logged)
    # The fetcher finished the sync it held before stopping (its command was acked)...
    fetcher = events["fetcher-0"]
    assert fetcher.index("worker.stopping") < fetcher.index("sync.fetched"), fetcher
    # ...and nothing is half-applied: every batch recorded as stored brought all its messages,
    # and no message is stored outside a recorded batch.
    counts = faults.sql(database_url, """
        SELECT (SELECT COALESCE(sum(messages), 0) FROM sync_batches WHERE run_id = %s) AS batched,
               (SELECT count(*) FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
                 WHERE f.mailbox_id = %s) AS placed""", (run_id, mailbox_id))[0]
    assert counts["batched"] == counts["placed"] > 0, counts
    # New workers complete the run from what the stopped ones handed over: no second fetch.
    procs.start("fetcher")
    procs.start("persister")
    _done(faults.wait_for_run(database_url, run_id, procs), procs)
    assert faults.sql(database_url, "SELECT lease_token FROM mailboxes WHERE id = %s",
                      (mailbox_id,)) == [{"lease_token": 1}]
    assert faults.assert_store_equals_server(server, USER, database_url, mailbox_id,
                                             FOLDERS) == 2500
