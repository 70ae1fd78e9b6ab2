"""structlog set-up: configured once per process, JSON off a terminal, pretty on one.

Secrets never reach a log line: :func:`redact` drops the values of keys that look like secrets, and
connection URLs have their password masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|credential|authorization", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@\s]+@", re.IGNORECASE)
# Fencing tokens are counters, not secrets.
_NOT_SECRET = {"lease_token", "token_fenced"}


def mask_url(url: str) -> str:
    """``amqp://guest:guest@host//`` -> ``amqp://guest:***@host//``."""
    return _URL_PASSWORD.sub(r"\g<scheme>:***@", url)


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key in _NOT_SECRET:
            continue
        if _SECRET_KEYS.search(key):
            event[key] = "***"
        elif isinstance(event[key], str) and "://" in event[key]:
            event[key] = mask_url(event[key])
    return event


def configure_logging(level: str = "info", fmt: str = "auto", service: str | None = None) -> None:
    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        structlog.processors.format_exc_info if not pretty else structlog.dev.set_exc_info,
        (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if pretty
         else structlog.processors.JSONRenderer()),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=current_stderr()),
        cache_logger_on_first_use=True,
    )
    if service:
        structlog.contextvars.bind_contextvars(service=service)


class CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured: a
    caller that swaps stderr (a test capturing output, then closing it) never leaves the
    logger writing to a closed file."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def current_stderr() -> TextIO:
    """A file for structlog's PrintLogger that is always the current ``sys.stderr``."""
    return cast(TextIO, CurrentStderr())
