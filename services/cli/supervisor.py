"""``mailferry up``: the services as child processes, restarted when they die, stopped together.

Metrics: with ``MAILFERRY_METRICS_PORT=P``, the children serve theirs on consecutive ports in the
order they are listed (scheduler P, fetchers P+1..., persisters, notifier last), each keeping its
port across restarts; the supervisor itself serves none. One registry per process, as Prometheus
expects (no multiprocess files to clean up); ``deploy/prometheus.yml`` lists the ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import structlog

from mailferry.errors import backoff

log = structlog.get_logger(__name__)


@dataclass
class _Child:
    service: str
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)
    metrics_port: int | None = None

    def start(self) -> None:
        env = dict(os.environ)
        if self.metrics_port is not None:
            env["MAILFERRY_METRICS_PORT"] = str(self.metrics_port)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailferry.services.cli.main", self.service], env=env)
        self.started_at = time.monotonic()
        log.info("child.started", service=self.service, index=self.index, pid=self.process.pid,
                 metrics_port=self.metrics_port)


def supervise(counts: dict[str, int], metrics_port: int | None = None) -> None:
    children = [_Child(s, i) for s, n in counts.items() for i in range(n)]
    if metrics_port is not None:
        for offset, child in enumerate(children):
            child.metrics_port = metrics_port + offset
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    while not stopping:
        time.sleep(0.5)
        for child in children:
            assert child.process is not None
            code = child.process.poll()
            if code is None or stopping:
                continue
            # Back off when a child keeps dying at once (e.g. the database is down).
            quick = time.monotonic() - child.started_at < 10
            child.restarts = child.restarts + 1 if quick else 0
            delay = backoff(child.restarts + 1, 1.0, 30.0, jitter=0.0) if quick else 0.0
            log.warning("child.exited", service=child.service, code=code, restart_in=delay)
            time.sleep(delay)
            child.start()
    log.info("supervisor.stopping")
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
    log.info("supervisor.stopped")
