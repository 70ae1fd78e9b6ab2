"""Wiring of a fetcher worker: real adapters in, then consume SyncMailbox commands.

One process syncs ``MAILFERRY_FETCHER_CONCURRENCY`` mailboxes at once, each on a handler thread
with its own database connection and its own broker connection for publishing (a sync mostly
waits on its IMAP server); the broker's prefetch matches, and the consuming thread acks.
"""

from __future__ import annotations

import functools

from mailferry import db, topology
from mailferry.broker import PublisherPool
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.imap import connector_factory
from mailferry.service import run_worker, start, worker_id
from mailferry.services.fetcher.handlers import HANDLERS, FetcherDeps, command_given_up


def main(settings: Settings) -> None:
    start(settings, "fetcher")
    publishers = PublisherPool(settings.broker_url, settings.retry_delays)
    connections = db.ReconnectingPerThread(settings.database_url)
    deps = FetcherDeps(
        settings=settings,
        connection=connections,
        publish=publishers.publish,
        connectors=connector_factory,
        passwords=PasswordBox(settings.secret_key),
        fetcher_id=worker_id("fetcher"),
    )

    handlers = {kind: functools.partial(handler, deps=deps) for kind, handler in HANDLERS.items()}
    try:
        run_worker(settings, topology.FETCHER, handlers, publishers,
                   prefetch=settings.fetcher_concurrency,
                   concurrency=settings.fetcher_concurrency,
                   on_retry_exhausted=functools.partial(command_given_up, deps=deps))
    finally:
        if deps.slots is not None:
            deps.slots.close()
        connections.close()
