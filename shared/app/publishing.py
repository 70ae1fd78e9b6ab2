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
#: Many at once, with one wait for all their confirms (``Publisher.publish_many``).
PublishMany = Callable[[Sequence[AnyMessage]], None]
#: Publishers working at once where many commands go out together (a scheduler tick, `sync
#: --all`): a quorum queue confirms each message after its disk write, about 10 ms one at a
#: time; 8 at once share those writes (measured: 11 ms -> 1.9 ms per message; 16: no better).
PARALLEL_PUBLISHES = 8


@contextmanager
def publisher(settings: Settings) -> Iterator[Publisher]:
    """The Publisher connects on its first publish, so opening one costs nothing when nothing
    ends up published (a rename, a folder list that did not change)."""
    opened = Publisher(settings.broker_url, settings.retry_delays)
    try:
        yield opened
    finally:
        opened.close()


@contextmanager
def publisher_pool(settings: Settings, size: int = PARALLEL_PUBLISHES) -> Iterator[PublisherPool]:
    """A :class:`PublisherPool` for a block, always closed."""
    pool = PublisherPool(settings.broker_url, settings.retry_delays, size)
    try:
        yield pool
    finally:
        pool.close()


class PublisherPool:
    """Several Publishers behind one thread-safe ``publish``, for callers with many commands to
    send at once (see :data:`PARALLEL_PUBLISHES`); each connects on its first publish, so a
    pool used for one message opens one connection."""

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

    def publish_many(self, batch: Sequence[AnyMessage]) -> None:
        one = self._free.get()
        try:
            one.publish_many(batch)
        finally:
            self._free.put(one)

    def close(self) -> None:
        for one in self._all:
            one.close()
