"""One way to publish from an entry point: a Publisher opened for a block and always closed."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
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


class PublisherPool:
    """Several Publishers behind one thread-safe ``publish``: a RabbitMQ quorum queue confirms
    each message after its write is on disk, so one publisher waits about 10 ms per message,
    while 8 in parallel share those writes (measured: 11 ms -> 1.9 ms per message). For a
    caller with many commands to send at once (the scheduler's tick); each connects on its
    first publish."""

    def __init__(self, url: str, retry_delays: Sequence[float], size: int) -> None:
        self.size = size
        self._all = [Publisher(url, retry_delays) for _ in range(size)]
        self._free: queue.SimpleQueue[Publisher] = queue.SimpleQueue()
        for one in self._all:
            self._free.put(one)

    def publish(self, message: AnyMessage) -> None:
        one = self._free.get()
        try:
            one.publish(message)
        finally:
            self._free.put(one)

    def close(self) -> None:
        for one in self._all:
            one.close()
