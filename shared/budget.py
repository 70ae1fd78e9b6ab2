"""Provider limits per account: the download budget, and the presets of both budgets.

The download budget: how many bytes of mail one mailbox may download over a rolling window.

Providers cut IMAP for a day when an account downloads too much (Gmail: 2,500 MB a day, per
account, whatever the client). A first sync of a big mailbox would hit that and look broken, so the
fetcher asks this module before each batch and stops a folder where the budget ends; the next runs
go on from there (newest mail first, ``services.fetcher.planning``).

Counted conservatively: each message costs the larger of its declared size (RFC822.SIZE) and the
bytes received, plus ``MESSAGE_OVERHEAD`` for the FETCH response around it, and a batch is started
only when its declared cost fits. MB are 1,000,000 bytes. The usage is kept in
``mailbox_downloads``, one row per batch, so every fetcher of every host sees the same sum.

The connection budgets (how many IMAP connections one account, or one host, may have open at
once) take their limits from :func:`connection_limits`; ``shared/slots.py`` enforces them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailferry.config import Settings
from mailferry.db import Connection

MB = 1_000_000
MESSAGE_OVERHEAD = 1024  # bytes counted per message beyond its own: FETCH framing, flags, dates

#: IMAP connections per account where neither a preset nor MAILFERRY_MAX_CONNECTIONS_PER_ACCOUNT
#: says: Dovecot's default ``mail_max_userip_connections``.
DEFAULT_CONNECTIONS_PER_ACCOUNT = 10


@dataclass(frozen=True)
class Preset:
    """A provider's documented limits per account: daily downloads in MB, IMAP connections."""

    download_mb: float | None = None
    connections: int | None = None


#: Presets by IMAP host. Gmail: 2,500 MB of IMAP downloads a day and 15 connections per
#: account; Exchange Online: 20 IMAP connections per mailbox.
PRESETS: dict[str, Preset] = {
    "imap.gmail.com": Preset(download_mb=2500.0, connections=15),
    "imap.googlemail.com": Preset(download_mb=2500.0, connections=15),
    "outlook.office365.com": Preset(connections=20),
}


def host_key(host: str) -> str:
    """A host as presets and budgets know it: lower case, without a trailing dot."""
    return host.lower().rstrip(".")


def _smaller(setting: float | None, preset: float | None) -> float | None:
    """The one rule of every preset: the setting, the preset, or the smaller of both."""
    given = [v for v in (setting, preset) if v is not None]
    return min(given) if given else None


def limit_for(host: str, settings: Settings) -> int | None:
    """The budget in bytes for a mailbox on ``host``: the setting, the host's preset, or the
    smaller of both; None when neither applies."""
    mb = _smaller(settings.download_budget_mb, PRESETS.get(host_key(host), Preset()).download_mb)
    return int(mb * MB) if mb is not None else None


def connection_limits(host: str, settings: Settings) -> tuple[int, int | None]:
    """How many IMAP connections an account on ``host`` may have open at once (the setting,
    the host's preset, or the smaller of both; ``DEFAULT_CONNECTIONS_PER_ACCOUNT`` when neither
    says), and the host as a whole (``MAILFERRY_MAX_CONNECTIONS_PER_HOST``, or None)."""
    account = _smaller(settings.max_connections_per_account,
                       PRESETS.get(host_key(host), Preset()).connections)
    return (int(account) if account is not None else DEFAULT_CONNECTIONS_PER_ACCOUNT,
            settings.max_connections_per_host)


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
