"""Wiring of a fetcher worker: real adapters in, then consume SyncMailbox commands."""

from __future__ import annotations

from services.fetcher.handlers import FetcherDeps, command_dead_lettered, sync_mailbox
from shared import db, topology
from shared.broker import Delivery, Publisher
from shared.config import Settings
from shared.crypto import PasswordBox
from shared.imap import connector_factory
from shared.messages import AnyMessage, SyncFolders, SyncMailbox
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

    def handle(message: AnyMessage, delivery: Delivery) -> None:
        if isinstance(message, SyncMailbox | SyncFolders):
            sync_mailbox(message, deps, delivery)

    run_worker(settings, topology.FETCHER, handle, publisher,
               on_dead_letter=lambda cmd, reason: command_dead_lettered(cmd, reason, deps))
