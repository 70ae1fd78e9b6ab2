"""Wiring of a persister worker: a database connection in, then consume sync events."""

from __future__ import annotations

import time

from services.persister.handlers import PersisterDeps, event_dead_lettered, handle
from services.persister.indexer import Indexer
from shared import db, topology
from shared.broker import Delivery, Publisher
from shared.config import Settings
from shared.messages import AnyMessage
from shared.service import run_worker, start


def main(settings: Settings) -> None:
    start(settings, "persister")
    deps = PersisterDeps(connection=db.Reconnecting(settings.database_url))

    last_event = [0.0]

    def on_event(message: AnyMessage, _delivery: Delivery) -> None:
        last_event[0] = time.monotonic()
        handle(message, deps)

    indexer = Indexer(settings.database_url, lambda: last_event[0])
    indexer.start()
    try:
        run_worker(settings, topology.PERSISTER, on_event,
                   Publisher(settings.broker_url, settings.retry_delays),
                   prefetch=settings.persister_prefetch,
                   on_dead_letter=lambda event, reason: event_dead_lettered(event, reason, deps))
    finally:
        indexer.stop()
