"""The Prometheus alert rules are valid YAML in Prometheus' rule-file shape, and alert on
metrics the service exports (`promtool check rules` is not installed with the project)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from replicator.ops.metrics import PipelineCollector
from replicator.sink.stats import SinkStats

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def test_alert_rules_name_exported_metrics() -> None:
    document = yaml.safe_load(RULES.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert all(set(rule) <= {"alert", "expr", "for", "labels", "annotations"} for rule in rules)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(lambda: None, lambda: {"local": SinkStats()}))
    exported = set(re.findall(r"^(wedsync_\w+)", generate_latest(registry).decode(), re.M))
    alerts = {rule["alert"]: rule for rule in rules}
    assert {"WedsyncSinkDeadLetter", "WedsyncCriticalRecoveryPoint",
            "WedsyncRecoveryPointOverTenMinutes", "WedsyncSinkSpooling"} <= set(alerts)
    for rule in rules:
        used = set(re.findall(r"wedsync_\w+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used, exported)
