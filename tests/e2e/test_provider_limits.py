"""Provider limits end to end: throttling answers back a mailbox off, a budget spreads a first sync."""

from __future__ import annotations

import itertools
import json
import random
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailferry import db, topology
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.faults import assert_store_equals_server, queue_depth, sql
from mailferry.devkit.hostile_imap import FolderSpec, HostileImapServer
from tests.e2e.test_metrics import add_mailbox, scrape, value

# What providers answer when they limit an account, and on which command (README "Provider
# limits"); each one is injected by the hostile server into one mailbox's sync.
REFUSALS = {
    "gmail connections": ("AUTHENTICATE", "{tag} NO [ALERT] Too many simultaneous connections. "
                                          "(Failure)"),
    "dovecot connections": ("AUTHENTICATE", "{tag} NO [UNAVAILABLE] Maximum number of connections "
                                            "from user+IP exceeded (mail_max_userip_connections=10)"),
    "greeting bye": ("GREETING", "* BYE Too many connections from your address, try later"),
    "gmail overquota": ("EXAMINE", "{tag} NO [OVERQUOTA] Account exceeded command or bandwidth "
                                   "limits. (Failure)"),
    "throttled": ("FETCH", "{tag} NO [THROTTLED] Too many commands, slow down"),
    "exchange": ("FETCH", "{tag} BAD Request is throttled. Suggested Backoff Time: 299961 "
                          "milliseconds\n* BYE Connection closed. 14"),
    "bye rate limit": ("EXAMINE", "* BYE System busy: rate limit exceeded"),
}

# Mail within the first-sync window, so that a first sync FETCHes it.
RECENT = {"INBOX": FolderSpec(uids=range(1, 4), internal_date=datetime.now(UTC))}


def test_each_throttling_answer_backs_the_mailbox_off_and_nobody_is_notified(
    env: dict[str, str], processes: services.ServiceProcesses, conn: db.Connection,
    database_url: str, vhost: tuple[str, str],
) -> None:
    with ExitStack() as stack:
        throttled = {}
        for number, (name, refusal) in enumerate(REFUSALS.items()):
            server = stack.enter_context(HostileImapServer("refuse", refusal=refusal,
                                                           folders=RECENT))
            throttled[add_mailbox(conn, env, server.host, server.port, f"u{number}@example.com",
                                  "secret")] = name
        healthy_server = stack.enter_context(HostileImapServer("healthy", folders=RECENT))
        healthy = add_mailbox(conn, env, healthy_server.host, healthy_server.port,
                              "healthy@example.com", "secret")
        metrics_port = services.free_port()
        # every mailbox is due every second, unless the scheduler respects a back-off
        processes.env["MAILFERRY_SYNC_INTERVAL"] = "1"
        for service in ("scheduler", "persister", "notifier"):
            processes.start(service)
        processes.start("fetcher", env={"MAILFERRY_METRICS_PORT": str(metrics_port)})

        def runs() -> dict[int, list[dict[str, object]]]:
            rows = sql(database_url, "SELECT * FROM sync_runs ORDER BY requested_at")
            return {m: [r for r in rows if r["mailbox_id"] == m] for m in [*throttled, healthy]}

        assert services.eventually(lambda: all(
            r and r[0]["status"] not in ("queued", "running") for r in runs().values())
            and len(runs()[healthy]) >= 3, timeout=90), processes.logs()
        time.sleep(2)  # the healthy mailbox is synced again and again meanwhile; the others not
        after = runs()
        for mailbox_id, name in throttled.items():
            assert len(after[mailbox_id]) == 1, (name, after[mailbox_id])
            [run] = after[mailbox_id]
            assert (run["status"], run["error_kind"]) == ("failed", "throttled"), (name, run)
        mailboxes = {r["id"]: r for r in sql(database_url, """
            SELECT id, credentials_invalid_at, last_error_kind,
                   extract(epoch FROM throttled_until - now()) AS wait FROM mailboxes""")}
        for mailbox_id, name in throttled.items():
            box = mailboxes[mailbox_id]
            assert box["credentials_invalid_at"] is None, name
            assert box["last_error_kind"] == "throttled", name
            assert box["wait"] > 60, name  # 300 s doubling, with jitter: at least 150 s
        exchange = next(m for m, name in throttled.items() if name == "exchange")
        assert mailboxes[exchange]["wait"] > 290  # the server's suggested 299.961 s
        assert sql(database_url, "SELECT count(*) AS n FROM notifications")[0]["n"] == 0
        for work in topology.WORK_QUEUES:
            assert queue_depth(vhost[0], work.dead_letter_name) == 0
        fetcher = scrape(metrics_port)
        assert value(fetcher, "mailferry_fetcher_syncs_total", outcome="throttled",
                     error_kind="throttled") == len(REFUSALS)
        listed = json.loads(services.run_cli(["mailbox", "list", "--json"], env).stdout)
        assert {m["id"] for m in listed if m["throttled_until"]} == set(throttled)


def test_a_budget_of_a_few_mb_spreads_a_first_sync_over_runs_newest_first_until_complete(
    env: dict[str, str], processes: services.ServiceProcesses, conn: db.Connection,
    database_url: str, tmp_path: Path,
) -> None:
    count, size = 30, 100_000  # 3 MB of mail against a budget of 0.75 MB: 7 messages a run
    now = datetime.now(UTC)
    rng = random.Random(14)
    with Dovecot(tmp_path / "dovecot") as server:
        server.add_user("alice", "secret")
        with server.session("alice") as imap:
            for n in range(count):  # the oldest first: UIDs follow arrival
                imap.append("INBOX", mail.plain_message(n, rng, size),
                            msg_time=now - timedelta(hours=count - n))
        mailbox_id = add_mailbox(conn, env, server.host, server.port, "alice@example.com",
                                 "secret")
        # a day of budget lasts two seconds here; runs follow each other every second
        processes.env.update({"MAILFERRY_DOWNLOAD_BUDGET_MB": "0.75",
                              "MAILFERRY_DOWNLOAD_BUDGET_WINDOW": "2",
                              "MAILFERRY_SYNC_INTERVAL": "1"})
        for service in ("scheduler", "fetcher", "persister"):
            processes.start(service)
        complete = services.eventually(lambda: sql(database_url, """
            SELECT 1 FROM folders f WHERE f.mailbox_id = %s AND f.raw_name = 'INBOX'
               AND f.last_uid > 0 AND f.backfill_below IS NULL
               AND (SELECT count(*) FROM message_folders mf WHERE mf.folder_id = f.id) = %s""",
            (mailbox_id, count)), timeout=120)
        assert complete, processes.logs()
        assert_store_equals_server(server, "alice", database_url, mailbox_id, ["INBOX"])
    runs = sql(database_url, """SELECT messages_stored FROM sync_runs
                                 WHERE mailbox_id = %s AND messages_stored > 0
                                 ORDER BY requested_at""", (mailbox_id,))
    assert len(runs) >= 4
    assert max(r["messages_stored"] for r in runs) <= 7
    # newest first: what each run stored arrived later than all that the next runs stored
    stored = sql(database_url, """
        SELECT array_agg(internal_date ORDER BY internal_date) AS dates FROM message_folders
         GROUP BY created_at ORDER BY created_at""")
    for earlier, later in itertools.pairwise(stored):
        assert min(earlier["dates"]) > max(later["dates"])
