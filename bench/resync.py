"""Benchmark: the cost of a sync when little changed (issue "sync fidelity").

Why this exists: after the first sync, every sync should cost what changed, not the size of the
mailbox (DESIGN invariant 6). Two figures say whether that holds:

1. **An unchanged folder re-synced.** For N messages in INBOX (default 1,000 and 20,000), after
   the initial sync, ``mailferry sync --mailbox ID --wait --json`` runs several times. For each
   run: the fetcher's own wall time (``seconds`` of its ``sync.fetched`` log line), the IMAP
   commands it sent (counted by a small TCP proxy between the fetcher and Dovecot; the mailbox
   is registered with the proxy's port) and the run's publish -> done time
   (``sync_runs.finished_at - requested_at``). Target: fetcher under 100 ms with CONDSTORE, and
   about the same at 1,000 and 20,000 messages.
2. **One new message.** One message is APPENDed to INBOX (straight to Dovecot, not through the
   proxy), then ``mailferry sync --mailbox ID`` is started and ``message_folders`` polled every
   10 ms until the new UID's row is visible: publish -> row (median of 5).

Both run against a Dovecot announcing CONDSTORE/QRESYNC (its default) and one with them hidden
(``capabilities_hidden``), where the fetcher falls back to a full FLAGS pass and a UID SEARCH.

This is a report, not a test: it exits with 1 only when a result is wrong (a failed run, a store
that does not hold N messages, a new message that never shows up), never because it is slow.
Run it with ``.venv/bin/python bench/resync.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from mailferry import db, topology
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot, dovecot_version
from mailferry.devkit.measure import json_lines, machine, peak_memory_mb, wait_for_consumers
from mailferry.devkit.tcp_proxy import Command, TcpProxy

USER, PASSWORD, OWNER_EMAIL = "bench", "bench-secret", "bench@example.com"
TARGET_FETCHER_SECONDS = 0.100  # the issue: an unchanged folder costs the fetcher < 100 ms
# "Barely differ" between N = 1,000 and N = 20,000, made concrete here: within 20 ms or 25%.
SAME_ABSOLUTE, SAME_RELATIVE = 0.020, 0.25
MODES = {"condstore": (), "no-condstore": ("CONDSTORE", "QRESYNC")}


def command_names(commands: list[Command]) -> str:
    """[LOGIN ***, UID FETCH 1:5 (FLAGS)] -> "LOGIN, UID FETCH" (in order, repeats counted)."""
    names = [command.verb for command in commands]
    counted = Counter(names)
    return ", ".join(f"{n} x{counted[n]}" if counted[n] > 1 else n for n in dict.fromkeys(names))


def traffic(proxy: TcpProxy) -> dict[str, Any]:
    """What the proxy recorded since the last call (commands, sessions, bytes), and reset."""
    return dataclasses.asdict(proxy.take())


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def round_trip_ms(port: int, rounds: int = 200) -> float:
    """Median NOOP round trip in ms on a fresh session at ``port`` (direct or via the proxy)."""
    from imapclient import IMAPClient

    client = IMAPClient("127.0.0.1", port, ssl=False, timeout=10)
    try:
        client.login(USER, PASSWORD)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            client.noop()
            times.append(time.perf_counter() - started)
    finally:
        client.logout()
    return round(statistics.median(times) * 1000, 3)


# --- one case: N messages, one mode ----------------------------------------------------------


def fetcher_seconds(log: Path, run_id: str, timeout: float = 5.0) -> float | None:
    """``seconds`` of the fetcher's ``sync.fetched`` line for this run."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in json_lines(log):
            if entry.get("event") == "sync.fetched" and entry.get("run_id") == run_id:
                return float(entry["seconds"])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def run_times(conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any]:
    row = conn.execute(
        """SELECT status, extract(epoch FROM requested_at)::float8,
                  extract(epoch FROM finished_at - requested_at)::float8
             FROM sync_runs WHERE id = %s""", (run_id,)).fetchone()
    assert row is not None
    return {"status": row[0], "requested_at": row[1], "publish_to_done": row[2]}


def run_case(n: int, mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    case: dict[str, Any] = {"messages": n, "mode": mode, "rtt_ms": args.rtt_ms}
    base = work / f"{mode}-{n}"
    with Dovecot(base / "dovecot", capabilities_hidden=MODES[mode]) as server:
        server.add_user(USER, PASSWORD)
        corpus = mail.Written()
        factory = mail.MessageFactory(args.seed, datetime.now(UTC))
        server.fill_maildir(USER, "INBOX", mail.generate(factory, n, corpus))
        with server.session(USER) as client:  # Dovecot indexes the new files once, here
            client.select_folder("INBOX", readonly=True)
            if len(client.search(["ALL"])) != n:
                raise RuntimeError("Dovecot does not see the messages written")
        proxy = TcpProxy(server.host, server.port, latency=args.rtt_ms / 2000)
        proxy.start()
        with services.private_database() as database_url, \
                services.private_vhost() as (_, broker_url), \
                psycopg.connect(database_url, autocommit=True) as conn:
            db.migrate(database_url)
            # Dovecot and the proxy are on 127.0.0.1: private networks allowed
            env = services.deployment_env(database_url, broker_url, fast=False,
                                          MAILFERRY_LOG_LEVEL="info")
            services.cli_json(["user", "add", "--email", OWNER_EMAIL], env)
            mailbox_id = int(services.cli_json(
                ["mailbox", "add", "--owner", OWNER_EMAIL, "--host", "127.0.0.1", "--port",
                 str(proxy.port), "--security", "none", "--username", USER, "--password-stdin",
                 "--folders", "INBOX"], env, stdin=f"{PASSWORD}\n".encode())["id"])
            (base / "logs").mkdir()
            fetcher_log = base / "logs" / "fetcher-0.log"
            processes = services.ServiceProcesses(env, base / "logs")
            try:
                for service in ("fetcher", "persister", "notifier"):
                    processes.start(service)
                wait_for_consumers(broker_url, {topology.FETCHER.name: 1,
                                                topology.PERSISTER.name: 1,
                                                topology.NOTIFIER.name: 1})
                case["round_trip_ms"] = {"direct": round_trip_ms(server.port),
                                         "proxy": round_trip_ms(proxy.port)}

                def synced() -> dict[str, Any]:
                    """One ``sync --wait`` through the pipeline, with its figures."""
                    proxy.take()  # what came before (sessions still closing) is not this run's
                    out = services.cli_json(["sync", "--mailbox", str(mailbox_id), "--wait", "--timeout",
                                str(args.timeout), "--json"], env, timeout=args.timeout + 60)
                    run_id = out[0]["run_id"]
                    imap = traffic(proxy)
                    return {**run_times(conn, run_id), **imap,
                            "fetcher": fetcher_seconds(fetcher_log, run_id)}

                print(f"[{mode} N={n}] initial sync ...", flush=True)
                initial = synced()
                stored = conn.execute("SELECT count(*) FROM messages").fetchone()
                case["initial"] = {"publish_to_done": round(initial["publish_to_done"], 2),
                                   "fetcher": initial["fetcher"],
                                   "commands": command_names(initial["commands"])}
                ok = initial["status"] == "done" and stored is not None and stored[0] == n

                print(f"[{mode} N={n}] {args.resyncs} re-syncs of the unchanged folder ...",
                      flush=True)
                resyncs = [synced() for _ in range(args.resyncs)]
                ok = ok and all(r["status"] == "done" for r in resyncs)
                case["resync"] = summarise_runs(resyncs)
                # The same re-syncs without the proxy in the way: what the proxy itself costs.
                conn.execute("UPDATE mailboxes SET port = %s WHERE id = %s",
                             (server.port, mailbox_id))
                direct = [synced() for _ in range(args.resyncs)]
                conn.execute("UPDATE mailboxes SET port = %s WHERE id = %s",
                             (proxy.port, mailbox_id))
                ok = ok and all(r["status"] == "done" for r in direct)
                case["resync_direct"] = {
                    key: _stats([r[key] for r in direct if r[key] is not None])
                    for key in ("fetcher", "publish_to_done")}

                print(f"[{mode} N={n}] {args.new_messages} x one new message ...", flush=True)
                news = [new_message(server, factory, n + i, env, conn, mailbox_id, proxy,
                                    fetcher_log, args) for i in range(args.new_messages)]
                ok = ok and all(r["status"] == "done" and r["publish_to_row"] is not None
                                for r in news)
                case["new_message"] = summarise_runs(news)
                for key in ("publish_to_row", "command_to_row"):
                    values = [r[key] for r in news if r[key] is not None]
                    case["new_message"][key] = _stats(values)
                case["peak_memory_mb"] = {name: peak_memory_mb(p.pid) for name, p in processes.processes}
                dead = [(name, p.returncode) for name, p in processes.processes
                        if p.poll() is not None]
                ok = ok and not dead
            finally:
                processes.stop()
                proxy.stop()
            if not ok:
                print(processes.logs(), file=sys.stderr)
        case["ok"] = ok
    return case


def new_message(server: Dovecot, factory: mail.MessageFactory, index: int, env: dict[str, str],
                conn: psycopg.Connection[Any], mailbox_id: int, proxy: TcpProxy,
                fetcher_log: Path, args: argparse.Namespace) -> dict[str, Any]:
    """APPEND one message, start ``mailferry sync``, poll until its placement row is there."""
    raw = factory.message(index)[0]
    uid = server.append(USER, None, "INBOX", raw)
    if uid is None:
        raise RuntimeError("APPEND returned no APPENDUID")
    proxy.take()
    started = time.time()
    cli = subprocess.Popen([sys.executable, "-m", "mailferry.services.cli.main", "sync", "--mailbox",
                            str(mailbox_id), "--json"], env=os.environ | env,
                           cwd=services.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    visible = None
    while time.time() - started < args.timeout:
        if conn.execute(
                """SELECT 1 FROM message_folders mf JOIN folders f ON f.id = mf.folder_id
                    WHERE f.mailbox_id = %s AND f.raw_name = 'INBOX' AND mf.uid = %s""",
                (mailbox_id, uid)).fetchone():
            visible = time.time()
            break
        time.sleep(0.010)
    out, err = cli.communicate(timeout=60)
    if cli.returncode != 0:
        raise RuntimeError(f"mailferry sync failed: {err.decode(errors='replace')[-2000:]}")
    run_id = json.loads(out)[0]["run_id"]
    deadline = time.monotonic() + args.timeout
    while (times := run_times(conn, run_id))["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return {**times, **traffic(proxy), "fetcher": fetcher_seconds(fetcher_log, run_id),
            "publish_to_row": visible - times["requested_at"] if visible else None,
            "command_to_row": visible - started if visible else None}


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "all": []}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def timeline(run: dict[str, Any]) -> list[tuple[str, float]]:
    """Where the IMAP session's time goes, in ms: accept -> first command (TCP connect and
    greeting), then each command -> the next one (its round trip plus whatever the fetcher did
    before sending the next), the last one -> close."""
    if not run["sessions"] or not run["commands"]:
        return []
    start, end = run["sessions"][0]
    times = [t for t, _ in run["commands"]]
    steps = [("connect", times[0] - start)]
    steps += [(command.verb, after - command.at) for command, after in
              zip(run["commands"], [*times[1:], end], strict=True)]
    return [(name, round(seconds * 1000, 1)) for name, seconds in steps]


def median_timeline(runs: list[dict[str, Any]]) -> list[tuple[str, float]]:
    lines = [timeline(r) for r in runs]
    if not lines or len({tuple(n for n, _ in line) for line in lines}) != 1:
        return lines[-1] if lines else []
    return [(name, round(statistics.median(line[i][1] for line in lines), 1))
            for i, (name, _) in enumerate(lines[0])]


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sets = Counter(command_names(r["commands"]) for r in runs)
    return {
        "fetcher": _stats([r["fetcher"] for r in runs if r["fetcher"] is not None]),
        "publish_to_done": _stats([r["publish_to_done"] for r in runs
                                   if r["publish_to_done"] is not None]),
        "imap_session": _stats([end - start for r in runs for start, end in r["sessions"]]),
        "imap_timeline_ms": median_timeline(runs),
        "commands_count": sorted({len(r["commands"]) for r in runs}),
        "commands": dict(sets),  # command list -> how many runs sent exactly that
        "example": [_short(command.text) for command in runs[-1]["commands"]],
        "bytes_up": statistics.median(r["bytes_up"] for r in runs),
        "bytes_down": statistics.median(r["bytes_down"] for r in runs),
    }


def code_state() -> dict[str, Any]:
    """The commit, and the product files changed in the working tree: they are what ran."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=services.REPO, capture_output=True,
                              text=True, check=False).stdout
    changed = [line[3:] for line in git("status", "--porcelain", "--", "services",
                                        "shared").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "changed": changed}


# --- report ----------------------------------------------------------------------------------


def verdicts(cases: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by = {(c["mode"], c["messages"]): c for c in cases}
    for (mode, n), case in by.items():
        median = case["resync"]["fetcher"]["median"]
        if mode == "condstore" and median is not None:
            out[f"fetcher_under_100ms_N{n}"] = median < TARGET_FETCHER_SECONDS
    for mode in MODES:
        sizes = sorted(n for m, n in by if m == mode)
        if len(sizes) >= 2:
            low = by[(mode, sizes[0])]["resync"]["fetcher"]["median"]
            high = by[(mode, sizes[-1])]["resync"]["fetcher"]["median"]
            if low is not None and high is not None:
                out[f"same_at_N{sizes[0]}_and_N{sizes[-1]}_{mode}"] = (
                    high - low <= max(SAME_ABSOLUTE, SAME_RELATIVE * low))
    return out


def print_report(summary: dict[str, Any]) -> None:
    m = summary["machine"]
    print()
    print("== re-sync when little changed ==")
    print(f"machine  {m['nproc']} CPUs ({m['cpu']}), {m['memory_gb']} GB RAM, Linux "
          f"{m['kernel']}, Python {m['python']}; load {m['load_1min']} at the start")
    print(f"date     {summary['date']}; Dovecot {summary['dovecot']}; code "
          f"{summary['code']['commit']} + {len(summary['code']['changed'])} changed files")
    print("unchanged INBOX, median of the re-syncs (min-max); seconds")
    print(f"{'mode':<13}{'N':>7}  {'fetcher':<22}{'publish->done':<22}{'IMAP':<7}"
          f"{'no proxy: fetcher, p->d':<25}{'cmds':>4}  commands")
    for c in summary["cases"]:
        r, d = c["resync"], c["resync_direct"]
        print(f"{c['mode']:<13}{c['messages']:>7}  {_range(r['fetcher']):<22}"
              f"{_range(r['publish_to_done']):<22}{_range(r['imap_session'], False):<7}"
              f"{_range(d['fetcher'], False) + ', ' + _range(d['publish_to_done'], False):<25}"
              f"{'/'.join(map(str, r['commands_count'])):>4}  {' | '.join(r['commands'])}")
    print("one new message: median of publish -> row visible in message_folders (polled 10 ms)")
    print(f"{'mode':<13}{'N':>7}  {'publish->row':<22}{'command->row':<22}{'fetcher':<22}"
          "commands")
    for c in summary["cases"]:
        r = c["new_message"]
        print(f"{c['mode']:<13}{c['messages']:>7}  {_range(r['publish_to_row']):<22}"
              f"{_range(r['command_to_row']):<22}{_range(r['fetcher']):<22}"
              f"{' | '.join(r['commands'])}")
    print("where an unchanged re-sync's IMAP session goes (ms, median per step)")
    for c in summary["cases"]:
        print(f"{c['mode']:<13}{c['messages']:>7}  " + ", ".join(
            f"{name} {ms:g}" for name, ms in c["resync"]["imap_timeline_ms"]))
    for c in summary["cases"]:
        print(f"{c['mode']:<13}{c['messages']:>7}  initial sync {c['initial']['publish_to_done']}"
              f" s ({c['initial']['commands']}); NOOP round trip {c['round_trip_ms']['direct']} "
              f"ms direct, {c['round_trip_ms']['proxy']} ms via the proxy; "
              f"{'OK' if c['ok'] else 'WRONG'}")
    print("targets  " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                  for k, v in summary["targets"].items()))
    print()
    print(json.dumps(summary, ensure_ascii=False, sort_keys=True))


def _range(stats: dict[str, Any], spread: bool = True) -> str:
    if stats.get("median") is None:
        return "-"
    if not spread:
        return f"{stats['median']:.3f}"
    return f"{stats['median']:.3f} ({stats['min']:.3f}-{stats['max']:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", default="1000,20000", help="N values (default 1000,20000)")
    parser.add_argument("--modes", default=",".join(MODES), help="condstore,no-condstore")
    parser.add_argument("--resyncs", type=int, default=7, help="re-syncs per case (default 7)")
    parser.add_argument("--new-messages", type=int, default=5, help="(default 5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="round trip the proxy adds between fetcher and Dovecot (e.g. 50; default 0)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per sync")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.messages.split(",")]
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {unknown}")
    summary: dict[str, Any] = {"benchmark": "resync",
                               "date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "machine": machine(), "dovecot": dovecot_version(),
                               "code": code_state(), "cases": []}
    work = Path(tempfile.mkdtemp(prefix="mailferry-resync-"))
    try:
        for n in sizes:
            for mode in modes:
                summary["cases"].append(run_case(n, mode, args, work))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary["targets"] = verdicts(summary["cases"])
    print_report(summary)
    return 0 if all(c["ok"] for c in summary["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
