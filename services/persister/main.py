"""Wiring of a persister worker: database connections in (one per handler thread), then consume sync
events."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from mailferry import db, metrics, topology
from mailferry.broker import Publisher
from mailferry.config import Settings
from mailferry.service import run_worker, start
from mailferry.services.persister.handlers import HANDLERS, PersisterDeps, event_given_up
from mailferry.services.persister.indexer import Indexer, Parser
from mailferry.services.persister.relay import Relay


def main(settings: Settings) -> None:
    start(settings, "persister")
    connections = db.ReconnectingPerThread(settings.database_url)
    deps = PersisterDeps(connection=connections)

    last_event = [0.0]  # when the latest event was handled
    in_flight = [0]  # events being handled now
    counting = threading.Lock()

    def busy(handler: Callable[..., None]) -> Callable[[Any], None]:
        def handle(event: Any) -> None:
            with counting:
                in_flight[0] += 1
            try:
                handler(event, deps)
            finally:
                with counting:
                    in_flight[0] -= 1
                    last_event[0] = time.monotonic()
        return metrics.measured_event(handle)

    def latest() -> float:
        # The parse step and the indexer wait for quiet: an event that takes longer than their
        # QUIET (a batch of 500 on a loaded machine) must not look like quiet.
        return math.inf if in_flight[0] else last_event[0]

    metrics.watch_store(settings.database_url, search_backlog=True)

    # Follow-up steps (services/persister/indexer.py): the parse of mail stored unparsed, then
    # its search vectors.
    parser = Parser(settings.database_url, latest)
    parser.start()
    indexer = Indexer(settings.database_url, latest)
    indexer.start()
    # The change stream's relay, on its own broker connection (services/persister/relay.py).
    relay = Relay(settings.database_url, Publisher(settings.broker_url, settings.retry_delays),
                  settings.changes_retention)
    relay.start()
    stopped = False

    def stop_helpers() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            relay.stop()
            relay.publisher.close()
            parser.stop()
            indexer.stop()

    try:
        run_worker(settings, topology.PERSISTER,
                   {kind: busy(handler) for kind, handler in HANDLERS.items()},
                   Publisher(settings.broker_url, settings.retry_delays),
                   prefetch=settings.persister_prefetch,
                   concurrency=settings.persister_concurrency,
                   on_retry_exhausted=functools.partial(event_given_up, deps=deps),
                   on_stop=stop_helpers)
    finally:
        stop_helpers()  # run_worker may fail before it consumes
        connections.close()
