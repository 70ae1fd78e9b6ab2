"""Wiring of a fetcher worker: real adapters in, then consume SyncMailbox commands."""

from __future__ import annotations

import functools

from services.fetcher.handlers import HANDLERS, FetcherDeps, command_given_up
from shared import db, topology
from shared.broker import Publisher
from shared.config import Settings
from shared.crypto import PasswordBox
from shared.imap import connector_factory
from shared.service import run_worker, start, worker_id


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
