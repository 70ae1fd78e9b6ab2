"""Wiring of the scheduler: every MAILFERRY_SCHEDULER_TICK seconds, queue the due mailboxes."""

from __future__ import annotations

import signal
import threading

import structlog

from mailferry import db, metrics
from mailferry.app.publishing import PARALLEL_PUBLISHES, PublisherPool
from mailferry.config import Settings
from mailferry.errors import MailferryError
from mailferry.service import start
from mailferry.services.scheduler.handlers import tick

log = structlog.get_logger(__name__)


def main(settings: Settings) -> None:
    start(settings, "scheduler")
    publisher = PublisherPool(settings.broker_url, settings.retry_delays, PARALLEL_PUBLISHES)
    connection = db.Reconnecting(settings.database_url)
    metrics.watch_store(settings.database_url, scheduler_interval=settings.sync_interval)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("scheduler.running", interval=settings.sync_interval, tick=settings.scheduler_tick)
    while not stop.is_set():
        try:
            tick(connection(), publisher.publish, settings)
        except MailferryError as exc:  # the database or broker is away: try again next tick
            log.warning("schedule.tick_failed", error=str(exc))
        except Exception:
            log.exception("schedule.tick_failed")
        stop.wait(settings.scheduler_tick)
    publisher.close()
    log.info("scheduler.stopped")
