"""Wiring of the notifier: consume credential events; on a timer, reminders and retries."""

from __future__ import annotations

import functools

from mailferry import db, metrics, topology
from mailferry.broker import Publisher
from mailferry.config import Settings
from mailferry.service import run_worker, start
from mailferry.services.notifier.channels import RealtimePublisher, SmtpSender
from mailferry.services.notifier.handlers import HANDLERS, NotifierDeps, tick


def main(settings: Settings) -> None:
    start(settings, "notifier")
    publisher = Publisher(settings.broker_url, settings.retry_delays)
    email = (SmtpSender(settings.smtp_url.get_secret_value(), settings.smtp_from,
                        settings.smtp_timeout, settings.smtp_ca_file)
             if settings.smtp_url else None)
    deps = NotifierDeps(
        connection=db.Reconnecting(settings.database_url),
        reminder_seconds=settings.notify_reminder,
        retry_base_seconds=settings.notify_retry_base,
        send_email=metrics.counted_channel("email", email.send) if email else None,
        send_realtime=(metrics.counted_channel("realtime", RealtimePublisher(publisher).send)
                       if settings.realtime else None),
    )

    handlers = {kind: functools.partial(handler, deps=deps) for kind, handler in HANDLERS.items()}
    run_worker(settings, topology.NOTIFIER, handlers, publisher,
               on_tick=lambda: tick(deps), tick_seconds=settings.notifier_tick)
