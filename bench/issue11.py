"""Every target of issue 11, measured side by side in one run, with the machine's load.

Runs the benchmarks that measure them, one after the other, each as its own process (their own
private database, vhost and Dovecot), and reads the JSON line each one prints last:

- ``scheduler_tick.py``: one tick with 100,000 mailboxes in the table (target: <= 1 s);
- ``scale.py``: 1,000 mailboxes of 20 messages, 2 fetchers and 2 persisters, initial and no-op
  ``sync --all``, direct and at 50 ms RTT (targets: no-op >= 50 mailboxes/s at 50 ms RTT,
  zero deadlocks, the fetchers' RSS reported; ``mailbox import`` of 1,000 in <= 10 s);
- ``initial_sync.py`` three times (N = 20,000, 1 fetcher + 1 persister, mbsync once per
  variant in each run, so every ratio compares two tools measured minutes apart at most):
  targets <= 1.0x mbsync, <= 2.0x mbsync ``FSync no``, persister CPU <= 0.35 ms per message,
  RabbitMQ <= 1.1x the mail's bytes;
- the test of a first sync longer than RabbitMQ's ``consumer_timeout``
  (tests/e2e/test_fetcher_concurrency.py), which must pass.

A report, not a test: it prints a table of every target, met or not, then one JSON line with
every figure. It exits with 1 only when a benchmark failed (a wrong result, not a slow one).
About 10 minutes on 2 cores. Before each step it waits (up to 2 minutes) for the 1-minute load
to fall below 2.5. Run it on a quiet machine: the load at each step's start and the CPU other
programs used are in the report.

    .venv/bin/python bench/issue11.py [--runs 3] [--messages 20000] [--mailboxes 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable


def load() -> float:
    return round(os.getloadavg()[0], 2)


def settle(below: float = 2.5, longest: float = 120.0) -> None:
    """Wait (at most ``longest`` seconds) for the 1-minute load to fall below ``below``: the
    step before (a thousand Dovecot logins, a 20,000-message sync) leaves it high for a while,
    and the next step would start on a busy machine."""
    deadline = time.monotonic() + longest
    while load() >= below and time.monotonic() < deadline:
        time.sleep(5)


def run_bench(script: str, args: list[str]) -> dict[str, Any]:
    """One benchmark in its own process; its own output goes by as it runs (stderr kept
    apart), its last JSON line is the result."""
    settle()
    started, at = time.perf_counter(), load()
    print(f"\n### {script} {' '.join(args)} (load {at})", flush=True)
    process = subprocess.run([PYTHON, str(HERE / script), *args], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, check=False)
    lines = process.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("{")), flush=True)
    result = next((json.loads(line) for line in reversed(lines) if line.startswith("{")), {})
    result["_exit"] = process.returncode
    result["_seconds"] = round(time.perf_counter() - started, 1)
    result["_load_at_start"] = at
    return result


def run_long_sync_test() -> dict[str, Any]:
    test = ("tests/e2e/test_fetcher_concurrency.py::"
            "test_a_first_sync_longer_than_the_consumer_timeout_completes_in_slices")
    settle()
    started, at = time.perf_counter(), load()
    print(f"\n### pytest {test} (load {at})", flush=True)
    process = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                             cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
    print(process.stdout.strip().splitlines()[-1] if process.stdout.strip() else "", flush=True)
    return {"passed": process.returncode == 0, "_exit": process.returncode,
            "_seconds": round(time.perf_counter() - started, 1), "_load_at_start": at}


def spread(values: list[float]) -> str:
    if not values:
        return "(none)"
    shown = ", ".join(f"{v:g}" for v in values)
    if len(values) == 1:
        return shown
    return (f"{shown} (mean {statistics.mean(values):.3g}, "
            f"stdev {statistics.stdev(values):.2g})")


def verdict(values: list[float], ok: Any) -> str:
    if not values:
        return "not measured"
    met = sum(1 for v in values if ok(v))
    return "met" if met == len(values) else "NOT met" if not met else f"met in {met} of {len(values)}"


def report(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, figures, verdict, conditions) rows."""
    rows: list[tuple[str, str, str, str]] = []
    syncs = [r for r in results["initial_sync"] if r.get("pipeline_ok")]
    loads = ", ".join(f"{r['machine']['load_1min']}" for r in syncs)

    def sync_row(name: str, key: str, ok: Any, unit: str = "") -> None:
        values = [r[key] for r in syncs if r.get(key) is not None]
        rows.append((name, spread(values) + unit, verdict(values, ok),
                     f"{len(syncs)} runs, load at start {loads}"))

    sync_row("initial sync: pipeline / mbsync (default FSync yes) <= 1.0", "ratio",
             lambda v: v <= 1.0)
    sync_row("initial sync: pipeline / mbsync FSync no <= 2.0", "ratio_nofsync",
             lambda v: v <= 2.0)
    sync_row("initial sync: persister CPU per message <= 0.35 ms",
             "persister_cpu_ms_per_message", lambda v: v <= 0.35, " ms")
    sync_row("initial sync: bytes RabbitMQ takes in per mail byte <= 1.1",
             "rabbit_received_per_email_byte", lambda v: v <= 1.1)
    sync_row("initial sync: bytes RabbitMQ writes to disk per mail byte <= 1.1 (machine-wide)",
             "rabbit_disk_written_per_email_byte_later", lambda v: v <= 1.1)
    for key, name in (("pipeline_seconds", "pipeline seconds"),
                      ("mbsync_seconds", "mbsync seconds (FSync yes)"),
                      ("mbsync_nofsync_seconds", "mbsync seconds (FSync no)")):
        rows.append((f"  (initial sync: {name})", spread([r[key] for r in syncs if key in r]),
                     "", ""))

    scale = results["scale"]
    rounds = {r["round"]: r for r in scale.get("rounds", [])}
    latency = rounds.get("latency")
    if latency:
        rate = latency["noop"]["mailboxes_per_s"]
        rows.append(("no-op sync --all at 50 ms RTT >= 50 mailboxes/s (2 fetchers)", f"{rate}",
                     "met" if rate >= 50 else "NOT met",
                     f"{scale['mailboxes']} x {scale['messages']}, load mean "
                     f"{latency['noop']['load_1min']['mean']}"))
    for name, r in rounds.items():
        rows.append((f"  ({name}: initial / no-op mailboxes/s)",
                     f"{r['initial']['mailboxes_per_s']} / {r['noop']['mailboxes_per_s']}", "",
                     ""))
    if rounds:
        deadlocks = sum(r["deadlocks_after"] - r["deadlocks_before"] for r in rounds.values())
        rows.append(("zero deadlocks in a whole scale run", str(deadlocks),
                     "met" if deadlocks == 0 else "NOT met", "pg_stat_database, every pass"))
        rss = [v for r in rounds.values() for v in r["fetcher_peak_rss_mb"]]
        rows.append(("fetchers' RSS reported", f"{min(rss)}-{max(rss)} MB", "reported", ""))
        imports = [r["import_seconds"] for r in rounds.values()]
        rows.append(("mailbox import of 1,000 <= 10 s", spread(imports) + " s",
                     verdict(imports, lambda v: v <= 10), "CLI start-up included"))

    tick = results["scheduler_tick"]
    if "many due" in tick:
        cases = {c: tick[c]["seconds"] for c in ("few due", "none due", "many due") if c in tick}
        rows.append(("scheduler tick, 100,000 mailboxes <= 1 s",
                     ", ".join(f"{c} {v:.3f} s" for c, v in cases.items()),
                     verdict(list(cases.values()), lambda v: v <= 1.0),
                     f"{tick['many due']['due']} due in the last"))
    long_sync = results["long_sync_test"]
    rows.append(("a first sync longer than consumer_timeout completes",
                 "test passed" if long_sync["passed"] else "test FAILED",
                 "met" if long_sync["passed"] else "NOT met", "short consumer_timeout on a vhost"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="initial_sync.py runs (3)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--tick-mailboxes", type=int, default=100_000)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.strip()
    results: dict[str, Any] = {
        "benchmark": "issue11", "commit": commit, "load_at_start": load(),
        "date": datetime.now(UTC).isoformat(timespec="seconds")}
    started = time.perf_counter()
    results["scheduler_tick"] = run_bench("scheduler_tick.py",
                                          ["--mailboxes", str(args.tick_mailboxes)])
    results["scale"] = run_bench("scale.py", ["--mailboxes", str(args.mailboxes)])
    results["initial_sync"] = [
        run_bench("initial_sync.py", ["--messages", str(args.messages), "--mbsync-runs", "1"])
        for _ in range(args.runs)]
    results["long_sync_test"] = run_long_sync_test()
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_at_end"] = load()

    rows = report(results)
    print(f"\n== issue 11, every target in one run (commit {commit}, {results['date']}, "
          f"load {results['load_at_start']} at the start, {results['load_at_end']} at the end, "
          f"{results['seconds']:.0f} s) ==")
    width = max(len(r[0]) for r in rows)
    for target, figures, met, where in rows:
        print(f"{target:<{width}}  {figures:<44} {met:<14} {where}")
    results["targets"] = [dict(zip(("target", "figures", "verdict", "conditions"), r,
                                   strict=True)) for r in rows]
    print()
    print(json.dumps(results))
    steps = [results["scheduler_tick"], results["scale"], *results["initial_sync"]]
    return 0 if all(s["_exit"] == 0 for s in steps) and results["long_sync_test"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
