"""One way to publish from an entry point: a Publisher opened for a block and always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mailferry.broker import Publisher
from mailferry.config import Settings
from mailferry.messages import AnyMessage

#: What the service layer publishes with: confirmed, persistent (``Publisher.publish``).
Publish = Callable[[AnyMessage], None]


@contextmanager
def publisher(settings: Settings) -> Iterator[Publisher]:
    """The Publisher connects on its first publish, so opening one costs nothing when nothing
    ends up published (a rename, a folder list that did not change)."""
    opened = Publisher(settings.broker_url, settings.retry_delays)
    try:
        yield opened
    finally:
        opened.close()
