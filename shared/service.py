"""Start-up shared by the four services: logging, migrations, the publisher, the worker loop."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import structlog

from mailferry import db, metrics
from mailferry.broker import Handlers, Publisher, PublisherPool, RetryExhausted, Worker
from mailferry.config import Settings
from mailferry.logging import configure_logging
from mailferry.topology import WorkQueue

log = structlog.get_logger(__name__)


def worker_id(service: str) -> str:
    return f"{service}@{socket.gethostname()}:{os.getpid()}"


def start(settings: Settings, service: str) -> None:
    """Logging, then the schema (waiting for PostgreSQL to come up, as in docker-compose)."""
    configure_logging(settings.log_level, settings.log_format, service=service)
    applied = db.migrate_when_ready(settings.database_url)
    log.info("service.starting", worker=worker_id(service), migrations_applied=applied)
    metrics.serve(service, settings.metrics_port, settings.metrics_addr)


def run_worker(settings: Settings, work: WorkQueue, handlers: Handlers,
               publisher: Publisher | PublisherPool, prefetch: int = 1, concurrency: int = 1,
               on_retry_exhausted: RetryExhausted | None = None,
               on_tick: Callable[[], None] | None = None, tick_seconds: float = 15.0,
               on_stop: Callable[[], None] | None = None) -> None:
    """Consume ``work`` with the service's ``HANDLERS`` (bound to their adapters). ``on_stop``
    stops the process's helper threads once consuming ended, before ``worker.stopped``: that
    line is the process's last."""
    worker = Worker(
        on_retry_exhausted=on_retry_exhausted,
        on_tick=on_tick,
        tick_seconds=tick_seconds,
        url=settings.broker_url,
        work=work,
        handlers=handlers,
        publisher=publisher,
        retry_delays=settings.retry_delays,
        prefetch=prefetch,
        concurrency=concurrency,
        heartbeat=settings.broker_heartbeat,
    )
    worker.install_signal_handlers()
    log.info("worker.consuming", queue=work.name, concurrency=worker.concurrency,
             prefetch=worker.prefetch)
    try:
        worker.run()
    finally:
        try:
            if on_stop is not None:
                on_stop()
        finally:
            publisher.close()
            log.info("worker.stopped", queue=work.name)
