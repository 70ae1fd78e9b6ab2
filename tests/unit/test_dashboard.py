"""The Grafana dashboard (deploy/grafana/mailferry.json) asks only for metrics mailferry serves.

Whether each query returns data is checked against a real run by scripts/render_dashboard.py
(it needs Prometheus); this catches a renamed metric without one."""

from __future__ import annotations

import json
import re

from mailferry import metrics
from mailferry.devkit import services

DASHBOARD = services.REPO / "deploy" / "grafana" / "mailferry.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def served_names() -> set[str]:
    """Every metric family a mailferry process can serve: the registered collectors' and the
    gauges read from PostgreSQL at scrape time (named in shared/metrics.py)."""
    collectors = [*metrics.COMMON, *(c for group in metrics.SERVED.values() for c in group)]
    names = {family.name for collector in collectors for family in collector.describe()}
    source = (services.REPO / "shared" / "metrics.py").read_text()
    return names | set(re.findall(r'"(mailferry_[a-z_]+)"', source))


def test_every_panel_has_a_place_and_queries_only_metrics_mailferry_or_rabbitmq_serve() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    served = served_names()
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        for target in panel.get("targets", []):
            for name in re.findall(r"\b((?:mailferry|rabbitmq)_[a-z_]+)", target["expr"]):
                if name.startswith("rabbitmq_"):
                    continue  # rabbitmq_prometheus's own
                base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
                assert name in served or base in served, (panel["title"], name)
