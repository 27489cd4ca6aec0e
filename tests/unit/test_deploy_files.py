"""The Grafana dashboard and the docker-compose provisioning of Prometheus and Grafana hold
together: the dashboard's shape (a Prometheus datasource variable, RPO per tier on top, a
row per stage), its queries on metrics the service exports, and every file the compose
file mounts exists where the provisioning looks for it. That the queries run is checked
against a real Prometheus in tests/integration/test_alerting.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from tests.unit.test_alert_rules import ROOT, exported_metrics

DASHBOARD = ROOT / "deploy" / "grafana" / "wedsync-replicator.json"
COMPOSE = ROOT / "docker-compose.yml"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, as written (with Grafana's variables)."""
    return [target["expr"] for panel in all_panels(dashboard()["panels"])
            for target in panel.get("targets", [])]


def test_dashboard_shape() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["destination"]["datasource"]["uid"] == "${datasource}"
    assert "destination" in variables["destination"]["definition"]
    panels = list(all_panels(board["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert board["panels"][0] is rows[0] and "RPO" in rows[0]["title"]
    titles = " | ".join(r["title"] for r in rows)
    for stage in ("Capture", "Kafka", "$destination", "Compaction"):
        assert stage in titles, (stage, titles)
    assert [r.get("repeat") for r in rows if "$destination" in r["title"]] == ["destination"]
    # Right under the first row: the recovery point of each tier.
    top = board["panels"][1:5]
    assert [t["expr"] for p in top for t in p["targets"]] == [
        f'max(wedsync_rpo_seconds{{tier="{tier}"}})'
        for tier in ("critical", "high", "normal", "low")]
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_dashboard_queries_name_exported_metrics() -> None:
    exported = exported_metrics()
    used = {name for expr in dashboard_queries() for name in re.findall(r"wedsync_\w+", expr)}
    assert used <= exported, used - exported
    assert {"wedsync_rpo_seconds", "wedsync_capture_lag_bytes", "wedsync_sink_lag_records",
            "wedsync_sink_bytes_written_total",
            "wedsync_compaction_last_success_timestamp_seconds"} <= used


def test_compose_provisions_prometheus_and_grafana_from_deploy() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    mounts: dict[str, str] = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target, *_ = volume.split(":")
            assert (ROOT / source).exists(), volume
            assert source.startswith("./deploy/"), volume
            mounts[target] = source
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (PROVISIONING / "dashboards" / "wedsync-replicator.yml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert mounts[f"{folder}/{DASHBOARD.name}"] == "./deploy/grafana/wedsync-replicator.json"
