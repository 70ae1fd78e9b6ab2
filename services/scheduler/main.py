"""Wiring of the scheduler: every MAILFERRY_SCHEDULER_TICK seconds, queue the due mailboxes;
meanwhile (unless MAILFERRY_PUSH=0) watch this process's share of the mailboxes for changes."""

from __future__ import annotations

import signal
import threading

import structlog

from mailferry import db, metrics
from mailferry.app.publishing import PARALLEL_PUBLISHES, PublisherPool
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.errors import ConfigError, MailferryError
from mailferry.service import start, worker_id
from mailferry.services.scheduler.handlers import tick
from mailferry.services.scheduler.watchers import Watchers

log = structlog.get_logger(__name__)


def main(settings: Settings) -> None:
    start(settings, "scheduler")
    publisher = PublisherPool(settings.broker_url, settings.retry_delays, PARALLEL_PUBLISHES)
    connection = db.Reconnecting(settings.database_url)
    metrics.watch_store(settings.database_url, scheduler_interval=settings.sync_interval)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    watchers = None
    if settings.push:
        try:
            passwords = PasswordBox(settings.secret_key)
        except ConfigError as exc:  # watching logs in: without the key, the schedule only
            log.warning("push.off", reason=str(exc))
        else:
            watchers = Watchers(settings, worker_id("scheduler"), publisher.publish, passwords)
            watchers.start()
            metrics.watch_watches(watchers.states)
    log.info("scheduler.running", interval=settings.sync_interval, tick=settings.scheduler_tick,
             push=settings.push)
    while not stop.is_set():
        try:
            tick(connection(), publisher.publish, settings, publisher.publish_many)
        except MailferryError as exc:  # the database or broker is away: try again next tick
            log.warning("schedule.tick_failed", error=str(exc))
        except Exception:
            log.exception("schedule.tick_failed")
        stop.wait(settings.scheduler_tick)
    if watchers is not None:
        watchers.stop()
    publisher.close()
    log.info("scheduler.stopped")
