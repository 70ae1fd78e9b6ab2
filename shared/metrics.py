"""Every Prometheus metric of mailferry, defined here and nowhere else (README "Watching it").

Each service process serves its own registry on ``MAILFERRY_METRICS_PORT`` (off when unset), and
under ``mailferry up`` each child takes the next port: counters stay per process, as Prometheus
expects, with no shared files. Labels are bounded sets (a reason, an outcome, an error kind, a
queue, an event type, a channel): never a mailbox id or a user, so the series stay few whatever
the number of mailboxes.

What PostgreSQL knows (the sync lag over enabled mailboxes, what is due, the search index backlog)
is read at scrape time by a collector (:class:`StoreCollector`), so it is as fresh as the scrape
and costs nothing between scrapes; a scrape while PostgreSQL is away leaves those series out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg.rows import dict_row

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: requested_by values kept as a label; anything else (a hand-published command's free text)
#: is counted as "other", so the label set stays bounded.
REASONS = ("scheduler", "cli", "broker", "push", "library")

# --- every service ------------------------------------------------------------------------------

DEAD_LETTERED = Counter(
    "mailferry_dead_lettered_messages", "Messages published to a dead-letter queue", ["queue"], registry=None)

# --- scheduler ----------------------------------------------------------------------------------

RUNS_REQUESTED = Counter(
    "mailferry_runs_requested", "Sync runs queued, by who asked", ["reason"], registry=None)

#: The states of a push watch (services/scheduler/watch.py), each one a series of
#: mailferry_scheduler_watched_mailboxes.
WATCH_STATES = ("watching", "polling", "backoff", "off")

# --- fetcher and scheduler (push watches) -------------------------------------------------------

SLOT_WAITS = Counter(
    "mailferry_connection_slot_waits",
    "IMAP connections not opened because the account's or host's connection budget was full "
    "(by purpose: sync, watch); the sync is put back for later, the watch backs off",
    ["purpose"], registry=None)

# --- fetcher ------------------------------------------------------------------------------------

SYNCS = Counter(
    "mailferry_fetcher_syncs",
    "Sync attempts by outcome (done, sliced, failed, retrying, throttled, waiting: no connection "
    "slot free) and error kind ('' when none)",
    ["outcome", "error_kind"], registry=None)
SYNC_SECONDS = Histogram(
    "mailferry_fetcher_sync_duration_seconds", "Wall-clock time of one sync attempt",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600), registry=None)
IMAP_CONNECTIONS = Gauge(
    "mailferry_fetcher_imap_connections", "IMAP connections this fetcher holds open", registry=None)
MESSAGES_FETCHED = Counter(
    "mailferry_fetcher_messages_fetched", "Messages fetched and published (with their bytes)", registry=None)
BYTES_FETCHED = Counter(
    "mailferry_fetcher_bytes_fetched", "Bytes of mail fetched and published", registry=None)
BUDGET_STOPS = Counter(
    "mailferry_fetcher_budget_exhausted", "Folders whose fetch stopped at the download budget", registry=None)
TOKEN_REFRESHES = Counter(
    "mailferry_fetcher_token_refreshes",
    "OAuth2 access tokens asked of a provider, by provider kind and outcome (refreshed, refused: "
    "the grant is invalid, unavailable: 429, 5xx or too slow, error: the provider's settings)",
    ["provider_kind", "outcome"], registry=None)

# --- persister ----------------------------------------------------------------------------------

EVENTS = Counter(
    "mailferry_persister_events",
    "Events handled by type and outcome (applied, refused: dead-lettered at once, failed: retried)",
    ["type", "outcome"], registry=None)
EVENT_SECONDS = Histogram(
    "mailferry_persister_event_duration_seconds",
    "Time to apply one event (a MessagesFetched event is one batch of mail)", ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=None)
MESSAGES_STORED = Counter(
    "mailferry_persister_messages_stored", "Messages in applied MessagesFetched events", registry=None)
BYTES_STORED = Counter(
    "mailferry_persister_bytes_stored", "Bytes of raw mail in applied MessagesFetched events", registry=None)

# --- notifier -----------------------------------------------------------------------------------

NOTIFICATIONS = Counter(
    "mailferry_notifier_notifications", "Notification deliveries by channel and outcome",
    ["channel", "outcome"], registry=None)


def reason(requested_by: str) -> str:
    return requested_by if requested_by in REASONS else "other"


#: What each service serves (besides the client's process_* and python_* metrics): its own
#: metrics and the common ones, so that a fetcher's page holds no persister counters at zero.
SERVED: dict[str, tuple[Collector, ...]] = {
    "scheduler": (RUNS_REQUESTED, SLOT_WAITS),
    "fetcher": (SYNCS, SYNC_SECONDS, IMAP_CONNECTIONS, MESSAGES_FETCHED, BYTES_FETCHED,
                BUDGET_STOPS, SLOT_WAITS, TOKEN_REFRESHES),
    "persister": (EVENTS, EVENT_SECONDS, MESSAGES_STORED, BYTES_STORED),
    "notifier": (NOTIFICATIONS,),
}
COMMON: tuple[Collector, ...] = (DEAD_LETTERED,)


def serve(service: str, port: int | None, addr: str = "0.0.0.0") -> None:
    """Serve ``service``'s metrics on ``/metrics`` from a daemon thread; nothing when ``port``
    is None (the metrics are still counted, just not served)."""
    if port is None:
        return
    for collector in (*COMMON, *SERVED[service]):
        REGISTRY.register(collector)
    start_http_server(port, addr=addr)
    log.info("metrics.serving", port=port, addr=addr)


@contextmanager
def imap_connection() -> Iterator[None]:
    """An IMAP connection held open for the duration of the block."""
    with IMAP_CONNECTIONS.track_inprogress():
        yield


def counted_channel(channel: str, send: Callable[..., T]) -> Callable[..., T]:
    """``send`` for a notification channel, counting each call as sent or failed (both at zero
    from the start: Prometheus's increase() misses a series' first count)."""
    for outcome in ("sent", "failed"):
        NOTIFICATIONS.labels(channel, outcome)

    def counted(*args: Any, **kwargs: Any) -> T:
        try:
            result = send(*args, **kwargs)
        except Exception:
            NOTIFICATIONS.labels(channel, "failed").inc()
            raise
        NOTIFICATIONS.labels(channel, "sent").inc()
        return result

    return counted


def measured_event(handle: Callable[[Any], None]) -> Callable[[Any], None]:
    """The persister's handler, counting each event by type and outcome, timing it, and
    counting the mail of applied MessagesFetched events."""
    from mailferry.errors import PermanentError
    from mailferry.messages import MessagesFetched

    def measured(event: Any) -> None:
        kind = type(event).__name__
        started = time.perf_counter()
        try:
            handle(event)
        except PermanentError:
            EVENTS.labels(kind, "refused").inc()
            raise
        except Exception:
            EVENTS.labels(kind, "failed").inc()
            raise
        finally:
            EVENT_SECONDS.labels(kind).observe(time.perf_counter() - started)
        EVENTS.labels(kind, "applied").inc()
        if isinstance(event, MessagesFetched):
            MESSAGES_STORED.inc(len(event.messages))
            BYTES_STORED.inc(sum(len(m.raw) for m in event.messages if m.raw is not None))

    return measured


# --- what PostgreSQL knows, read at scrape time --------------------------------------------------

LAG_QUANTILES = (0.5, 0.9, 0.99, 1.0)

_LAG = """
SELECT count(*) AS mailboxes,
       count(*) FILTER (WHERE lag IS NULL) AS never_synced,
       COALESCE(sum(lag), 0) AS lag_sum,
       percentile_cont(%(q)s::float8[]) WITHIN GROUP (ORDER BY lag) AS quantiles,
       count(*) FILTER (WHERE throttled) AS throttled
  FROM (SELECT extract(epoch FROM now() - done.at)::float8 AS lag,
               m.throttled_until > now() AS throttled
          FROM mailboxes m
          -- a mailbox's runs follow each other: the latest asked for that is done finished last
          LEFT JOIN LATERAL (SELECT r.finished_at AS at FROM sync_runs r
                              WHERE r.mailbox_id = m.id AND r.status = 'done'
                                AND r.kind = 'mailbox'
                              ORDER BY r.requested_at DESC LIMIT 1) done ON true
         WHERE m.sync_enabled AND m.removing_at IS NULL) per_mailbox"""

_DUE = """
SELECT count(*) AS due,
       COALESCE(max(extract(epoch FROM now() - due_at)), 0) AS oldest_overdue
  FROM (SELECT COALESCE(last.at + make_interval(secs => %(interval)s), m.created_at) AS due_at
          FROM mailboxes m
          CROSS JOIN LATERAL (SELECT max(r.requested_at) AS at FROM sync_runs r
                               WHERE r.mailbox_id = m.id AND r.kind = 'mailbox') last
         WHERE m.sync_enabled AND m.credentials_invalid_at IS NULL AND m.removing_at IS NULL
           AND (m.throttled_until IS NULL OR m.throttled_until <= now())
           AND NOT EXISTS (SELECT 1 FROM sync_runs a WHERE a.mailbox_id = m.id
                              AND a.status IN ('queued', 'running'))) per_mailbox
 WHERE due_at <= now()"""


def sync_lag(conn: Any) -> dict[str, Any]:
    """Seconds since the last completed sync, over enabled mailboxes: how many, the quantiles
    (a mailbox never synced is left out of them and counted apart), how many are throttled.
    Also what ``mailferry status`` prints."""
    row = conn.execute(_LAG, {"q": list(LAG_QUANTILES)}).fetchone()
    quantiles = row["quantiles"] or [None] * len(LAG_QUANTILES)
    return {"mailboxes": row["mailboxes"], "never_synced": row["never_synced"],
            "throttled": row["throttled"], "sum_seconds": float(row["lag_sum"]),
            "quantiles": {str(q): (round(v, 1) if v is not None else None)
                          for q, v in zip(LAG_QUANTILES, quantiles, strict=True)}}


class StoreCollector(Collector):
    """Gauges read from PostgreSQL at each scrape: the scheduler's view (what is due, the sync
    lag) or the persister's (the search index backlog)."""

    def __init__(self, database_url: str, *, scheduler_interval: float | None = None,
                 search_backlog: bool = False) -> None:
        self._url = database_url
        self._interval = scheduler_interval
        self._backlog = search_backlog

    def describe(self) -> list[Any]:
        return []  # read at scrape time only (not at registration, when PostgreSQL may be away)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with psycopg.connect(self._url, autocommit=True, row_factory=dict_row,
                                 connect_timeout=5) as conn:
                # a few index lookups per mailbox: compiling them (JIT) would cost more
                conn.execute("SET statement_timeout = 5000; SET jit = off")
                yield from self._collect(conn)
        except psycopg.Error as exc:
            log.warning("metrics.store_unavailable", error=(str(exc).splitlines() or [""])[0])

    def _collect(self, conn: Any) -> Iterator[GaugeMetricFamily]:
        if self._interval is not None:
            due = conn.execute(_DUE, {"interval": self._interval}).fetchone()
            yield GaugeMetricFamily("mailferry_scheduler_due_mailboxes",
                                    "Mailboxes due for a sync and not queued yet", due["due"])
            yield GaugeMetricFamily("mailferry_scheduler_oldest_overdue_seconds",
                                    "How long the most overdue of them has been due",
                                    float(due["oldest_overdue"]))
            lag = sync_lag(conn)
            family = GaugeMetricFamily(
                "mailferry_sync_lag_seconds",
                "Seconds since the last completed sync, quantiles over enabled mailboxes "
                "synced at least once", labels=["quantile"])
            for q, value in lag["quantiles"].items():
                if value is not None:
                    family.add_metric([q], value)
            yield family
            yield GaugeMetricFamily("mailferry_sync_lag_seconds_sum",
                                    "Sum of the sync lag over those mailboxes", lag["sum_seconds"])
            yield GaugeMetricFamily("mailferry_enabled_mailboxes", "Enabled mailboxes",
                                    lag["mailboxes"])
            yield GaugeMetricFamily("mailferry_mailboxes_never_synced",
                                    "Enabled mailboxes without a completed sync",
                                    lag["never_synced"])
            yield GaugeMetricFamily("mailferry_mailboxes_throttled",
                                    "Enabled mailboxes backed off after a provider's limit, "
                                    "or waiting for a connection slot", lag["throttled"])
            slots = GaugeMetricFamily(
                "mailferry_imap_connection_slots",
                "IMAP connections open across the deployment, as counted by the connection "
                "budgets, by purpose (sync, watch)", labels=["purpose"])
            held = {r["purpose"]: r["n"] for r in conn.execute(
                """SELECT purpose, count(*) AS n FROM imap_connection_slots
                    WHERE expires_at > now() GROUP BY purpose""").fetchall()}
            for purpose in ("sync", "watch"):
                slots.add_metric([purpose], held.get(purpose, 0))
            yield slots
        if self._backlog:
            row = conn.execute(
                "SELECT count(*) AS n FROM messages WHERE search_vector IS NULL").fetchone()
            yield GaugeMetricFamily("mailferry_persister_search_backlog",
                                    "Stored messages not indexed for search yet", row["n"])
            row = conn.execute(
                "SELECT count(*) AS n FROM messages WHERE parsed_at IS NULL").fetchone()
            yield GaugeMetricFamily("mailferry_persister_parse_backlog",
                                    "Stored messages not parsed yet", row["n"])


class WatchCollector(Collector):
    """A scheduler's push watches by state, counted at scrape time."""

    def __init__(self, states: Callable[[], list[str]]) -> None:
        self._states = states

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = self._states()
        family = GaugeMetricFamily(
            "mailferry_scheduler_watched_mailboxes",
            "Mailboxes this scheduler watches for new mail (push), by the watch's state",
            labels=["state"])
        for state in WATCH_STATES:
            family.add_metric([state], states.count(state))
        yield family


def watch_watches(states: Callable[[], list[str]]) -> None:
    """Register a :class:`WatchCollector` on the process's registry (once per process)."""
    REGISTRY.register(WatchCollector(states))


def watch_store(database_url: str, **what: Any) -> None:
    """Register a :class:`StoreCollector` on the process's registry (once per process)."""
    REGISTRY.register(StoreCollector(database_url, **what))
