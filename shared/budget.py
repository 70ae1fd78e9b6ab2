"""The download budget: how many bytes of mail one mailbox may download over a rolling window.

Providers cut IMAP for a day when an account downloads too much (Gmail: 2,500 MB a day, per
account, whatever the client). A first sync of a big mailbox would hit that and look broken, so the
fetcher asks this module before each batch and stops a folder where the budget ends; the next runs
go on from there (newest mail first, ``services.fetcher.planning``).

Counted conservatively: each message costs the larger of its declared size (RFC822.SIZE) and the
bytes received, plus ``MESSAGE_OVERHEAD`` for the FETCH response around it, and a batch is started
only when its declared cost fits. MB are 1,000,000 bytes. The usage is kept in
``mailbox_downloads``, one row per batch, so every fetcher of every host sees the same sum.
"""

from __future__ import annotations

from collections.abc import Callable

from mailferry.config import Settings
from mailferry.db import Connection

MB = 1_000_000
MESSAGE_OVERHEAD = 1024  # bytes counted per message beyond its own: FETCH framing, flags, dates

#: Presets by IMAP host: the provider's documented daily download limit, in MB.
PRESETS: dict[str, float] = {
    "imap.gmail.com": 2500.0,
    "imap.googlemail.com": 2500.0,
}


def limit_for(host: str, settings: Settings) -> int | None:
    """The budget in bytes for a mailbox on ``host``: the setting, the host's preset, or the
    smaller of both; None when neither applies."""
    limits = [mb for mb in (settings.download_budget_mb,
                            PRESETS.get(host.lower().rstrip("."))) if mb is not None]
    return int(min(limits) * MB) if limits else None


def cost(declared: int, received: int = 0) -> int:
    return max(declared, received) + MESSAGE_OVERHEAD


class Budget:
    """What is left to download; ``limit`` None: no budget (``allows`` always, nothing recorded)."""

    def __init__(self, limit: int | None = None, used: int = 0,
                 record: Callable[[int], None] = lambda _n: None) -> None:
        self.limit = limit
        self.used = used
        self._record = record

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.used)

    def allows(self, nbytes: int) -> bool:
        return self.limit is None or self.used + nbytes <= self.limit

    def spend(self, nbytes: int) -> None:
        if self.limit is None or nbytes <= 0:
            return
        self.used += nbytes
        self._record(nbytes)


def open_budget(conn: Connection, mailbox_id: int, host: str, settings: Settings) -> Budget:
    """The mailbox's budget for one attempt: its limit, what the window already holds, and a
    recorder writing each batch's cost (autocommit, so a crash later still counts it)."""
    limit = limit_for(host, settings)
    if limit is None:
        return Budget()
    window = settings.download_budget_window
    conn.execute("""DELETE FROM mailbox_downloads
                     WHERE mailbox_id = %s AND at < now() - make_interval(secs => %s)""",
                 (mailbox_id, window))
    row = conn.execute("""SELECT COALESCE(sum(bytes), 0)::bigint AS used FROM mailbox_downloads
                           WHERE mailbox_id = %s AND at >= now() - make_interval(secs => %s)""",
                       (mailbox_id, window)).fetchone()

    def record(nbytes: int) -> None:
        conn.execute("INSERT INTO mailbox_downloads (mailbox_id, bytes) VALUES (%s, %s)",
                     (mailbox_id, nbytes))

    return Budget(limit, int(row["used"]) if row else 0, record)
