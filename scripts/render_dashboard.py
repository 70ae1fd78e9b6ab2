#!/usr/bin/env python3
"""Draw the Grafana dashboard's panels from a real run into a PNG, and check every query has data.

Why this exists: the README shows the dashboard (``deploy/grafana/mailferry.json``), and a
dashboard nobody has seen with data may hold queries that return nothing. Where this was written
there is no Docker engine and Grafana cannot be installed (it is not in Debian nor on PyPI), but
Prometheus is (Debian's ``prometheus``). So this script does what Grafana would, minus the
painting: it runs the real pipeline, lets a real Prometheus scrape it with the jobs of
``deploy/prometheus.yml``, evaluates each panel's PromQL with Prometheus's ``query_range`` API
(``$__rate_interval`` as Grafana computes it) and draws each panel where its ``gridPos`` puts it,
with matplotlib. The picture is the dashboard's queries and layout, not a Grafana screenshot.

What runs, all private and removed at the end (nothing shared is touched):
- a RabbitMQ node of its own (``mailferry.devkit.rabbitmq``) with ``rabbitmq_prometheus``, since
  the queue-depth panel reads RabbitMQ's metrics;
- a database of its own, a Dovecot with four mailboxes of mail, watched by push (first syncs
  spread by a small download budget, then new mail every couple of seconds), an OAuth2 mailbox
  (the devkit's fake provider, tokens of 10 s, two outages of its token endpoint), a fake server
  answering ``NO [THROTTLED]`` to every FETCH, two mailboxes with a wrong password (added during
  the run, once Prometheus scrapes), and unreadable messages sent to each work queue
  (dead-lettered);
- the scheduler, two fetchers, a persister and the notifier, each with its metrics port;
- ``prometheus`` on a free port with its own data directory, scraping every 5 s.

Needs ``apt-get install prometheus`` (the binary only: the script starts its own instance) and
``pip install -e '.[dashboard]'`` (matplotlib, PyYAML). Run it with
``.venv/bin/python scripts/render_dashboard.py`` (about 5 minutes with ``--minutes 4``); it
writes ``docs/dashboard.png`` and exits non-zero if a panel's query returned no data.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from mailferry import app, db, messages, topology
from mailferry.app import oauth as app_oauth
from mailferry.broker import Publisher
from mailferry.crypto import PasswordBox
from mailferry.devkit import mail, services
from mailferry.devkit.dovecot import Dovecot
from mailferry.devkit.hostile_imap import FolderSpec, HostileImapServer
from mailferry.devkit.oauth_provider import FakeProvider
from mailferry.devkit.rabbitmq import private_node

DASHBOARD = services.REPO / "deploy" / "grafana" / "mailferry.json"
SCRAPE_CONFIG = services.REPO / "deploy" / "prometheus.yml"
SCRAPE_SECONDS = 5
USERS = ("alice", "bob", "carol", "dave")
OAUTH_USER = "olivia@example.test"


# --- the run -------------------------------------------------------------------------------------

@contextmanager
def prometheus(directory: Path, config: dict[str, Any]) -> Iterator[str]:
    """A private Prometheus; yields its base URL. The config is written as JSON (which is YAML)."""
    directory.mkdir(parents=True)
    (directory / "prometheus.yml").write_text(json.dumps(config, indent=2))
    port = services.free_port()
    log = open(directory / "prometheus.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        ["prometheus", f"--config.file={directory / 'prometheus.yml'}",
         f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False
        if not services.eventually(ready, timeout=60, interval=0.5):
            raise RuntimeError((directory / "prometheus.log").read_text()[-2000:])
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def scrape_config(targets: dict[str, list[tuple[str, dict[str, str]]]]) -> dict[str, Any]:
    """deploy/prometheus.yml with each job's discovery replaced by this run's loopback ports:
    same job names, paths and labels the dashboard's queries rely on."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_SECONDS}s",
                        "evaluation_interval": f"{SCRAPE_SECONDS}s"}
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name not in targets:
            raise SystemExit(f"deploy/prometheus.yml has a job this script does not know: {name}")
        local = {k: v for k, v in job.items()
                 if k not in ("dns_sd_configs", "static_configs", "relabel_configs")}
        local["static_configs"] = [{"targets": [target], "labels": labels}
                                   for target, labels in targets[name]]
        jobs.append(local)
    config["scrape_configs"] = jobs
    return config


def add_mailbox(conn: db.Connection, env: dict[str, str], host: str, port: int, user: str,
                password: str) -> int:
    owner = f"{user}@example.com"
    app.add_user(conn, owner)
    return app.add_mailbox(conn, PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"])),
                           owner_email=owner, host=host, port=port, security="none",
                           username=user, password=password, folders=["INBOX"])


def message(n: int, rng: random.Random) -> bytes:
    """A message of a log-normal size (median about 8 KB), like real mail."""
    return mail.plain_message(n, rng, int(min(200_000, rng.lognormvariate(9.0, 0.9))))


def dead_letter_one_per_queue(broker_url: str, conn: db.Connection) -> None:
    """A message no service can read, to each work queue, and an event a persister refuses (it
    names another mailbox's run): each is dead-lettered at once."""
    run = conn.execute("""SELECT r.id, (SELECT min(m.id) FROM mailboxes m
                                          WHERE m.id <> r.mailbox_id) AS other
                            FROM sync_runs r LIMIT 1""").fetchone()
    assert run is not None, "no run yet"
    misaddressed = messages.SyncStarted(run_id=run["id"], mailbox_id=run["other"],
                                        lease_token=2**40, fetcher="render_dashboard",
                                        started_at=datetime.now(UTC))
    publisher = Publisher(broker_url, (1.0,))
    try:
        for work in topology.WORK_QUEUES:
            publisher.publish_raw(b"not json", exchange="", routing_key=work.name,
                                  type_="Nonsense")
        publisher.publish(misaddressed)
    finally:
        publisher.close()


def run_pipeline(work: Path, minutes: float) -> tuple[str, float, float, ExitStack]:
    """Start everything and drive the workload for ``minutes``. Returns the Prometheus URL, the
    run's start and end (epoch seconds) and the stack that stops it all."""
    stack = ExitStack()
    try:
        rabbit_metrics = services.free_port()
        print("starting a private RabbitMQ node, PostgreSQL database, Dovecot...", flush=True)
        broker = stack.enter_context(private_node(work / "rabbitmq",
                                                  prometheus_port=rabbit_metrics))
        database = stack.enter_context(services.private_database())
        db.migrate(database)
        env = services.deployment_env(
            database, broker,
            MAILFERRY_SYNC_INTERVAL="20", MAILFERRY_REALTIME="1", MAILFERRY_PUSH="1",
            # first syncs of a few MB spread over runs: the budget panel moves
            MAILFERRY_DOWNLOAD_BUDGET_MB="1", MAILFERRY_DOWNLOAD_BUDGET_WINDOW="30",
            MAILFERRY_THROTTLE_BACKOFF="20", MAILFERRY_THROTTLE_BACKOFF_MAX="40",
            MAILFERRY_METRICS_ADDR="127.0.0.1")
        # an OAuth2 mailbox too: access tokens of 10 s, so each scheduled sync asks for one
        idp = stack.enter_context(FakeProvider(access_lifetime=10.0, rotate=True,
                                               client_secret="render-secret"))
        server = stack.enter_context(Dovecot(work / "dovecot",
                                             oauth2_introspection_url=f"{idp.url}/introspect"))
        rng = random.Random(14)
        numbers = iter(range(1_000_000))
        for user in (*USERS, "erin", "frank", OAUTH_USER):
            server.add_user(user, "secret")
        for user in (*USERS, OAUTH_USER):
            with server.session(user) as imap:
                for _ in range(120):
                    imap.append("INBOX", message(next(numbers), rng))
        refusal = ("FETCH", "{tag} NO [THROTTLED] Too many commands, slow down")
        throttling = stack.enter_context(HostileImapServer(
            "refuse", refusal=refusal,
            folders={"INBOX": FolderSpec(uids=range(1, 4), internal_date=datetime.now(UTC))}))
        conn = stack.enter_context(db.connect(database, autocommit=True))
        for user in USERS:
            add_mailbox(conn, env, server.host, server.port, user, "secret")
        add_mailbox(conn, env, throttling.host, throttling.port, "throttled", "secret")
        box = PasswordBox(SecretStr(env["MAILFERRY_SECRET_KEY"]))
        app.add_user(conn, "olivia@example.com")
        app_oauth.add_provider(conn, box, name="fake", kind="generic", client_id=idp.client_id,
                               client_secret="render-secret", token_url=f"{idp.url}/token")
        app_oauth.add_oauth_mailbox(conn, box, owner_email="olivia@example.com", provider="fake",
                                    username=OAUTH_USER, refresh_token=idp.grant(OAUTH_USER),
                                    host=server.host, port=server.port, security="none",
                                    folders=["INBOX"])

        ports = {name: services.free_port() for name in
                 ("scheduler", "fetcher-0", "fetcher-1", "persister", "notifier")}
        processes = services.ServiceProcesses(env, work / "logs")
        (work / "logs").mkdir()
        stack.callback(processes.stop)
        for name, port in ports.items():
            processes.start(name.split("-")[0], env={"MAILFERRY_METRICS_PORT": str(port)})
        targets = {
            "mailferry": [(f"127.0.0.1:{port}", {"service": name.split("-")[0]})
                          for name, port in ports.items()],
            "rabbitmq": [(f"127.0.0.1:{rabbit_metrics}", {})],
        }
        url = stack.enter_context(prometheus(work / "prometheus", scrape_config(targets)))
        started = time.time()
        print(f"pipeline up, Prometheus at {url}; running for {minutes} minutes", flush=True)

        stop = threading.Event()

        def new_mail() -> None:
            feeder = random.Random(15)
            while not stop.wait(2.0):
                server.append(feeder.choice(USERS), None, "INBOX",
                              message(next(numbers), feeder))

        feeder = threading.Thread(target=new_mail, daemon=True)
        feeder.start()
        stack.callback(feeder.join)
        stack.callback(stop.set)
        deadline = started + minutes * 60
        events = [(0.15, lambda: add_mailbox(conn, env, server.host, server.port, "erin",
                                             "wrong")),
                  (0.3, lambda: dead_letter_one_per_queue(broker, conn)),
                  (0.5, lambda: add_mailbox(conn, env, server.host, server.port, "frank",
                                            "wrong")),
                  # the provider's outages (the first only creates the series: increase()
                  # cannot see a series' first count)
                  (0.4, lambda: idp.fail_next("500", times=2)),
                  (0.75, lambda: idp.fail_next("500", times=2)),
                  (0.7, lambda: dead_letter_one_per_queue(broker, conn))]
        while time.time() < deadline:
            processes.assert_running()
            elapsed = (time.time() - started) / (deadline - started)
            while events and events[0][0] <= elapsed:
                events.pop(0)[1]()
            time.sleep(1)
        time.sleep(2 * SCRAPE_SECONDS)  # the last changes scraped
        return url, started, time.time(), stack
    except BaseException:
        if "processes" in locals():
            print(processes.logs()[-6000:], file=sys.stderr)
        stack.close()
        raise


# --- the queries ---------------------------------------------------------------------------------

@dataclass
class Series:
    legend: str
    times: list[float]
    values: list[float]


@dataclass
class Panel:
    spec: dict[str, Any]
    series: list[Series] = field(default_factory=list)
    empty_targets: list[str] = field(default_factory=list)


def query_range(url: str, expr: str, start: float, end: float, step: int) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{query}", timeout=30) as answer:
        body = json.load(answer)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    if not template:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    while "{{" in out:  # a label the series does not have: Grafana prints nothing for it
        head, _, rest = out.partition("{{")
        out = head + rest.partition("}}")[2]
    return " ".join(out.split()) or "value"


def evaluate(dashboard: dict[str, Any], url: str, start: float, end: float) -> list[Panel]:
    """Every panel's targets over the run, with Grafana's substitutions: ``$__interval`` is the
    step, ``$__rate_interval`` max(4 scrape intervals, step + scrape interval)."""
    step = max(SCRAPE_SECONDS, math.ceil((end - start) / 300))
    rate_interval = max(4 * SCRAPE_SECONDS, step + SCRAPE_SECONDS)
    panels = []
    for spec in dashboard["panels"]:
        panel = Panel(spec)
        panels.append(panel)
        for target in spec.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", f"{rate_interval}s")
                    .replace("$__interval", f"{step}s")
                    .replace("$__range", f"{int(end - start)}s"))
            found = False
            for result in query_range(url, expr, start, end, step):
                points = [(float(t), float(v)) for t, v in result["values"]]
                if any(math.isfinite(v) for _, v in points):
                    found = True
                panel.series.append(Series(legend(target.get("legendFormat", ""),
                                                  result["metric"]),
                                           [t for t, _ in points], [v for _, v in points]))
            if not found:
                panel.empty_targets.append(target["expr"])
    return panels


# --- the picture ---------------------------------------------------------------------------------

BACKGROUND, PANEL, BORDER, TEXT, WEAK, GRID = (
    "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e", "#2a2d33")
# Grafana's classic palette, in its order
PALETTE = ("#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9",
           "#705DA0", "#508642", "#CCA300", "#447EBC", "#C15C17")


def scaled(value: float, steps: tuple[tuple[float, str], ...], suffix: str = "") -> str:
    for factor, unit in steps:
        if abs(value) >= factor:
            number = value / factor
            return f"{number:.3g} {unit}{suffix}".strip()
    return f"{value:.3g}{suffix}" if value else "0"  # below the smallest step


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        if value == 0:
            return "0"
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value / 60:.3g} min" if abs(value) >= 120 else f"{value:.3g} s"
    if unit == "Bps":
        return scaled(value, ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")), "/s")
    if unit == "ops":
        return scaled(value, ((1e6, "M"), (1e3, "K")), " ops/s")
    return scaled(value, ((1e6, "M"), (1e3, "K")))


def render(panels: list[Panel], out: Path, start: float, end: float,
           subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    from PIL import Image

    column, row, header, gap = 62.0, 30.0, 78.0, 6.0  # pixels (Grafana: 24 columns, 30 px rows)
    rows = max(p.spec["gridPos"]["y"] + p.spec["gridPos"]["h"] for p in panels)
    width, height = 24 * column + gap, header + rows * row + gap
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor=BACKGROUND)

    def box(x: float, top: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Pixels from the top-left corner to figure fractions (left, bottom, width, height)."""
        return x / width, 1 - (top + h) / height, w / width, h / height

    fig.text(gap / width, 1 - 8 / height, "mailferry", color=TEXT, fontsize=15,
             weight="bold", va="top")
    fig.text(gap / width, 1 - 32 / height, "\n".join(textwrap.wrap(subtitle, 210)),
             color=WEAK, fontsize=8.5, va="top")
    for panel in panels:
        grid = panel.spec["gridPos"]
        x, top = gap + grid["x"] * column, header + grid["y"] * row
        w, h = grid["w"] * column - gap, grid["h"] * row - gap
        if panel.spec["type"] == "row":
            fig.text((x + 2) / width, 1 - (top + h / 2 + 4) / height, panel.spec["title"],
                     color=TEXT, fontsize=11, weight="bold", va="center")
            continue
        fig.patches.append(Rectangle(box(x, top, w, h)[:2], w / width, h / height,
                                     transform=fig.transFigure, facecolor=PANEL,
                                     edgecolor=BORDER, linewidth=0.8, zorder=-1))
        fig.text((x + 8) / width, 1 - (top + 7) / height, panel.spec["title"], color=TEXT,
                 fontsize=9.5, weight="bold", va="top")
        shown = [s for s in panel.series if any(math.isfinite(v) for v in s.values)]
        listed = shown
        columns = max(1, min(len(shown), int(w // 165)))
        if math.ceil(len(shown) / columns) > 3:  # Grafana would scroll the legend: keep it short
            listed = [s for s in shown if any(v for v in s.values if math.isfinite(v))]
        zero = len(shown) - len(listed)
        legend_rows = math.ceil((len(listed) + bool(zero)) / columns) if shown else 0
        legend_height = 14 * legend_rows
        ax = fig.add_axes(box(x + 58, top + 28, w - 70, h - 28 - 22 - legend_height - 4))
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(colors=WEAK, labelsize=7.5, length=0)
        ax.grid(color=GRID, linewidth=0.6)
        unit = panel.spec.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, unit=unit: format_value(v, unit)))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
        ax.xaxis.set_major_locator(mdates.MinuteLocator(tz=UTC))
        ax.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
        for index, series in enumerate(shown):
            times = [datetime.fromtimestamp(t, UTC) for t in series.times]
            color = PALETTE[index % len(PALETTE)]
            ax.plot(times, series.values, color=color, linewidth=1.3,
                    label=series.legend if series in listed else None)
            ax.fill_between(times, series.values, color=color, alpha=0.08, linewidth=0)
        finite = [v for series in shown for v in series.values if math.isfinite(v)]
        ax.set_ylim(bottom=0, top=None if finite and max(finite) > 0 else 1)
        if not shown:
            ax.text(0.5, 0.5, "No data", color=WEAK, ha="center", va="center",
                    transform=ax.transAxes)
        if zero:
            ax.plot([], [], color=PANEL, label=f"(+{zero} at 0 throughout)")
        if shown:
            ax.legend(loc="upper left", ncols=columns, frameon=False, fontsize=7.5,
                      labelcolor=TEXT, handlelength=1.2, borderaxespad=0, columnspacing=1.2,
                      bbox_to_anchor=box(x + 8, top + h - legend_height - 4, 0, 0)[:2],
                      bbox_transform=fig.transFigure)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=BACKGROUND)
    plt.close(fig)
    # a palette of 256 colours: a third of the bytes, no visible loss on flat panels and lines
    with Image.open(out) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
            out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="how long the run lasts")
    parser.add_argument("--out", type=Path, default=services.REPO / "docs" / "dashboard.png")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    args = parser.parse_args()
    # stopped (SIGTERM): unwind, so that every private server started so far is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("prometheus") is None:
        raise SystemExit("no prometheus binary: apt-get install prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    work = Path(tempfile.mkdtemp(prefix="mailferry-dashboard-"))
    try:
        url, start, end, stack = run_pipeline(work, args.minutes)
        with stack:
            panels = evaluate(dashboard, url, start, end)
            # from the first scrape on (the services take a few seconds to start)
            start = min(t for p in panels for s in p.series for t in s.times)
            version = urllib.request.urlopen(f"{url}/api/v1/status/buildinfo", timeout=5)
            prometheus_version = json.load(version)["data"]["version"]
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    day = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d")
    render(panels, args.out, start, end, (
        f"deploy/grafana/mailferry.json: each panel's PromQL evaluated by Prometheus "
        f"{prometheus_version} over a real {args.minutes:g}-minute run on {day} (UTC), drawn by "
        "scripts/render_dashboard.py with matplotlib (not a Grafana screenshot). The run: "
        "4 Dovecot mailboxes watched by push (first syncs spread by a 1 MB/30 s download "
        "budget, new mail every 2 s), an OAuth2 mailbox (10 s tokens, two provider outages), "
        "a server answering NO [THROTTLED], two refused logins, unreadable messages "
        "dead-lettered; scrapes every 5 s."))
    empty = [(p.spec["title"], expr) for p in panels for expr in p.empty_targets]
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    for panel in panels:
        if panel.spec["type"] != "row":
            print(f"  {panel.spec['title']}: {len(panel.series)} series"
                  + (f", NO DATA for {panel.empty_targets}" if panel.empty_targets else ""))
    if empty:
        raise SystemExit(f"{len(empty)} queries returned no data: {empty}")


if __name__ == "__main__":
    main()
