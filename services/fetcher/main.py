"""Wiring of a fetcher worker: real adapters in, then consume SyncMailbox commands."""

from __future__ import annotations

import functools

from mailferry import db, topology
from mailferry.broker import Publisher
from mailferry.config import Settings
from mailferry.crypto import PasswordBox
from mailferry.imap import connector_factory
from mailferry.service import run_worker, start, worker_id
from mailferry.services.fetcher.handlers import HANDLERS, FetcherDeps, command_given_up


def main(settings: Settings) -> None:
    start(settings, "fetcher")
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    deps = FetcherDeps(
        settings=settings,
        connection=db.Reconnecting(settings.database_url),
        publish=publisher.publish,
        connectors=connector_factory,
        passwords=PasswordBox(settings.secret_key),
        fetcher_id=worker_id("fetcher"),
    )

    handlers = {kind: functools.partial(handler, deps=deps) for kind, handler in HANDLERS.items()}
    run_worker(settings, topology.FETCHER, handlers, publisher,
               on_retry_exhausted=functools.partial(command_given_up, deps=deps))
