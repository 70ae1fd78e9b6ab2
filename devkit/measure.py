"""Measuring helpers for the benchmarks: peak memory and CPU of a process, the machine, consumers.

The figures in bench/README.md are only comparable when taken the same way, so every bench reads
/proc through these functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mailferry import broker


def peak_memory_mb(pid: int) -> float | None:
    """VmHWM, the process's peak resident set, in MB; read before the process is stopped."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process: says which service did the work."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def machine() -> dict[str, Any]:
    """Enough about the machine to compare figures between runs."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    # The load before the run: other processes on a shared machine skew every figure.
    load = round(os.getloadavg()[0], 2)
    return {"nproc": os.cpu_count(), "memory_gb": round(memory_kb / 1024 / 1024, 1), "cpu": cpu,
            "kernel": platform.release(), "python": platform.python_version(),
            "load_1min": load}


def wait_for_consumers(broker_url: str, wanted: dict[str, int], timeout: float = 60.0,
                       check: Callable[[], None] | None = None) -> dict[str, int]:
    """Block until every work queue has its consumers: the clock must not include start-up.

    Asked over AMQP (a passive declare) rather than the management API, whose consumer counts lag
    by its statistics interval (5 s). ``check`` runs between polls (e.g. raise if a service died).
    Returns the consumer counts seen."""
    deadline = time.monotonic() + timeout
    conn = broker.connect(broker_url)
    try:
        channel = conn.channel()
        while True:
            if check is not None:
                check()
            counts: dict[str, int] = {}
            for queue in wanted:
                try:
                    counts[queue] = int(channel.queue_declare(queue, passive=True).consumer_count)
                except Exception:  # not declared yet: the channel is closed by the broker
                    channel = conn.channel()
                    counts[queue] = 0
            if all(counts[q] >= n for q, n in wanted.items()):
                return counts
            if time.monotonic() > deadline:
                raise RuntimeError(f"services not consuming after {timeout:g}s: {counts}")
            time.sleep(0.2)
    finally:
        conn.release()


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON records of a service log, skipping anything else a process printed."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)
