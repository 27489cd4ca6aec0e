"""The Prometheus alert rules: `promtool check rules` and `promtool test rules` (every alert
has a test in which it fires and one in which it does not), they alert on metrics the
service exports, and each names a README section as its runbook. promtool comes with
Debian's `prometheus` package (`make install` installs it); without it these tests fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from replicator.capture import CaptureStats
from replicator.ops.metrics import PipelineCollector
from replicator.sink.compaction import CompactionStats
from replicator.sink.stats import SinkStats

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"
README = ROOT / "README.md"
#: The scrape job the rules (WedsyncReplicatorDown) and deploy/prometheus/prometheus.yml use.
JOB = "wedsync-replicator"


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    tool = shutil.which("promtool")
    assert tool is not None, (
        "promtool is missing: `make install` installs it (Debian's `prometheus` package: "
        "apt-get install --no-install-recommends prometheus)")
    result = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def exported_metrics() -> set[str]:
    """The names on /metrics of a service with capture, one sink and its compaction."""
    capture = SimpleNamespace(
        stats=CaptureStats(last_heartbeat_rtt_s=0.1, events_by_tier={"critical": 1}),
        calendar=SimpleNamespace(unresolved=0))
    registry = CollectorRegistry(auto_describe=False)
    sink = SinkStats(lag={"t.critical/0": 0})
    registry.register(PipelineCollector(lambda: capture, lambda: {"local": sink},
                                        lambda: {"local": CompactionStats()}))
    return set(re.findall(r"^(wedsync_\w+)", generate_latest(registry).decode(), re.M))


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of *markdown* (outside code blocks)."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} +(.*?) *#*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_promtool_checks_the_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(rules())} rules found" in out, out


def test_promtool_unit_tests_pass() -> None:
    promtool("test", "rules", RULE_TESTS.name)


def test_every_alert_has_unit_tests_firing_and_not_firing() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text())
    assert document["rule_files"] == [RULES.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - fires == set(), "alerts without a test in which they fire"
    assert names - silent == set(), "alerts without a test in which they do not fire"


def test_alert_rules_name_exported_metrics() -> None:
    exported = exported_metrics()
    alerts = {rule["alert"]: rule for rule in rules()}
    assert len(alerts) == len(rules()), "duplicate alert names"
    assert {"WedsyncSinkDeadLetter", "WedsyncCriticalRecoveryPoint",
            "WedsyncRecoveryPointOverTenMinutes", "WedsyncSinkSpooling"} <= set(alerts)
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        used = set(re.findall(r"wedsync_\w+", rule["expr"]))
        assert used <= exported, (rule["alert"], used - exported)
        if not used:  # only the one about the scrape itself
            assert rule["expr"] == f'up{{job="{JOB}"}} == 0', rule["alert"]


def test_every_alert_has_severity_summary_and_an_existing_runbook() -> None:
    readme = README.read_text()
    anchors = github_anchors(readme)
    # The README's table of the alerts: each alert, its severity and its runbook's link.
    table = {name: line for line in readme.splitlines() if line.startswith("| `Wedsync")
             for name in re.findall(r"`(Wedsync\w+)`", line.split("|")[1])}
    for rule in rules():
        name, severity = rule["alert"], rule["labels"]["severity"]
        assert severity in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, name
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "README.md" and anchor in anchors, (name, anchor)
        assert severity in table[name] and f"](#{anchor})" in table[name], (name, table[name])
    assert set(table) == {rule["alert"] for rule in rules()}


def test_prometheus_config_loads_the_rules_and_scrapes_the_service() -> None:
    promtool("check", "config", "prometheus.yml")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    assert JOB in {job["job_name"] for job in config["scrape_configs"]}
