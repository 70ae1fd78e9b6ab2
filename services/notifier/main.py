"""Wiring of the notifier: consume credential events."""

from __future__ import annotations

from services.notifier.handlers import NotifierDeps, handle
from shared import db, topology
from shared.broker import Publisher
from shared.config import Settings
from shared.messages import AnyMessage
from shared.service import run_worker, start


def main(settings: Settings) -> None:
    start(settings, "notifier")
    deps = NotifierDeps(connection=db.Reconnecting(settings.database_url))

    def on_event(message: AnyMessage) -> None:
        handle(message, deps)

    run_worker(settings, topology.NOTIFIER, on_event,
               Publisher(settings.broker_url, settings.retry_delays))
