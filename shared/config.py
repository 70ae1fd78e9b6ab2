"""The one typed settings object, read from the environment (prefix ``MAILFERRY_``) at start-up.

No other module reads ``os.environ``: services and the CLI call :func:`load_settings` once and pass
the result (or the parts they need) down.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mailferry.imap.wire import Limits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILFERRY_", frozen=True, extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/mailferry"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    # Fernet keys, comma separated; the first encrypts, all decrypt (key rotation).
    secret_key: SecretStr | None = None

    sync_interval: float = Field(default=1800.0, gt=0, description="seconds between scheduled syncs")
    scheduler_tick: float = Field(default=15.0, gt=0, description="seconds between due checks")
    first_sync_days: int = Field(default=365, ge=1)
    # A run still queued or running after this long is given up, so a lost command cannot
    # block a mailbox forever.
    run_timeout: float = Field(default=6 * 3600.0, gt=0)

    lease_seconds: float = Field(default=60.0, gt=1)
    # A server is untrusted input (DESIGN invariant 9): silence between two reads, one command
    # from send to answer, and one whole sync attempt are each bounded, however slowly bytes come.
    imap_timeout: float = Field(default=60.0, gt=0)
    imap_command_timeout: float = Field(default=300.0, gt=0)
    sync_deadline: float = Field(default=3600.0, gt=0, description="seconds per sync attempt")
    # One response line (a SEARCH answer, a LIST line) held at most; larger ends the connection.
    imap_max_line_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    imap_ca_file: Path | None = None
    # Mailbox hosts are user input: loopback, private and link-local addresses are refused so a
    # user cannot point the fetcher at internal services. 1 allows them (tests, a LAN server).
    allow_private_networks: bool = False
    # Bounds on one MessagesFetched event, so memory stays bounded whatever the folder holds.
    batch_max_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    batch_max_messages: int = Field(default=500, ge=1)
    # The largest message carried whole; larger ones are recorded without their bytes.
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    def imap_limits(self) -> Limits:
        """What one command may cost, counted on the bytes received: a literal above the
        message limit is read and dropped; one answer holds at most a batch and a message."""
        return Limits(read_timeout=self.imap_timeout, command_timeout=self.imap_command_timeout,
                      max_line_bytes=self.imap_max_line_bytes,
                      max_response_bytes=self.batch_max_bytes + self.max_message_bytes
                      + self.imap_max_line_bytes,
                      max_literal_bytes=self.max_message_bytes)

    # Push (the scheduler watches mailboxes over IDLE/NOTIFY; README "Push"). 0 turns it off
    # for the whole deployment: only the schedule then.
    push: bool = True
    push_poll: float = Field(default=60.0, gt=0, description="seconds between STATUS polls")
    # RFC 2177 section 3: re-issue IDLE at least every 29 minutes.
    push_idle_renew: float = Field(default=29 * 60.0, gt=0, le=29 * 60.0)
    # Short: a server batches its own notifications (Dovecot: 0.5 s), the lines of one batch
    # come within milliseconds, and changes during a run cost one more run, not one each.
    push_debounce: float = Field(default=0.1, ge=0, description="seconds a burst is gathered")
    push_max_connections: int = Field(default=2000, ge=0, description="watches per scheduler")
    push_lease: float = Field(default=60.0, gt=1, description="seconds a watch lease lasts")
    push_backoff_max: float = Field(default=300.0, gt=0, description="longest reconnect wait")

    persister_prefetch: int = Field(default=4, ge=1)
    # Events one persister process applies at once (threads, each with its own PostgreSQL
    # connection): a batch mostly waits on PostgreSQL. The events of one run still take turns
    # (its row lock, shared/runs.py); their decoding and hashing, and other runs, overlap
    # (bench/README.md: 11.2 -> 9.8 s for one 20,000-message first sync).
    persister_concurrency: int = Field(default=2, ge=1, le=64)
    # Mailboxes one fetcher process syncs at once (threads: a sync mostly waits on its server);
    # the fetcher's broker prefetch is the same number. 16: a no-op sync 50 ms away is about
    # 0.45 s of round trips, so 2 processes at 8 could not pass 35 mailboxes/s (bench/scale.py).
    fetcher_concurrency: int = Field(default=16, ge=1, le=256)
    # A sync hands over to a ContinueSync command at the first batch or folder boundary after
    # this many seconds, so no delivery stays unacknowledged near RabbitMQ's consumer_timeout.
    fetcher_slice_seconds: float = Field(default=300.0, gt=0)
    # AMQP heartbeats of consuming connections (0: off); a dead broker or a hung worker is
    # noticed within about twice this.
    broker_heartbeat: float = Field(default=30.0, ge=0)
    retry_delays: Annotated[tuple[float, ...], NoDecode] = (5.0, 30.0, 120.0, 600.0)

    # Notifications of invalid credentials (the notifier).
    realtime: bool = False  # publish to the mailferry.notifications exchange (Web-STOMP)
    smtp_url: SecretStr | None = None  # smtp://, smtp+starttls:// or smtps://[user:pass@]host[:port]
    smtp_from: str = "mailferry@localhost"
    smtp_ca_file: Path | None = None
    smtp_timeout: float = Field(default=30.0, gt=0)
    notify_reminder: float = Field(default=24 * 3600.0, gt=0, description="seconds")
    notifier_tick: float = Field(default=15.0, gt=0, description="seconds between retry passes")
    notify_retry_base: float = Field(default=30.0, gt=0, description="first retry of a channel")

    # Prometheus metrics (shared/metrics.py): off when no port is set. Under `mailferry up`, each
    # child process takes the next port (the supervisor's children in order, from this one).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_addr: str = "0.0.0.0"

    # Provider limits (README "Provider limits"). A download budget per mailbox over a rolling
    # window, in MB of 1,000,000 bytes; unset: none, except the presets (Gmail: 2,500 MB a day).
    download_budget_mb: float | None = Field(default=None, gt=0)
    download_budget_window: float = Field(default=24 * 3600.0, gt=0, description="seconds")
    # A throttled mailbox waits this long before its next sync, doubling while it stays throttled
    # (with jitter), at most throttle_backoff_max; a server's own suggestion wins when longer.
    throttle_backoff: float = Field(default=300.0, gt=0, description="seconds")
    throttle_backoff_max: float = Field(default=6 * 3600.0, gt=0, description="seconds")
    # Connection budgets, deployment-wide (shared/slots.py): IMAP connections one account may
    # have open at once, fetchers' and watches' together; unset: the host's preset (Gmail 15,
    # Exchange Online 20) or 10 (Dovecot's default). Set: the smaller of it and the preset.
    max_connections_per_account: int | None = Field(default=None, ge=1)
    # ... and one host, for self-hosted servers limiting per client IP; unset: no limit.
    max_connections_per_host: int | None = Field(default=None, ge=1)

    # The change stream (shared/outbox.py): published rows are kept this long for consumers
    # catching up (`mailferry changes list --since SEQ`), then pruned by the relay.
    changes_retention: float = Field(default=7 * 86400.0, gt=0, description="seconds")

    log_format: str = Field(default="auto", pattern="^(auto|json|console)$")
    log_level: str = "info"

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    return Settings()
