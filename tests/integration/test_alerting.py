"""The alert rules and the dashboard against a real Prometheus scraping a live service.

A native Prometheus (Debian's `prometheus` package, as `make install` installs it) runs on
deploy/prometheus/prometheus.yml with a 1 s scrape and evaluation interval, its scrape job
pointed at a `replicator run` (capture and the sinks of two destinations: a local folder and
S3 behind a Toxiproxy proxy), and a copy of deploy/prometheus/alerts.yml whose `for:`
durations are cut to a few seconds (the expressions are the real ones). Under a workload:

- while both stores answer, none of the sink alerts fires;
- S3 cut off (the proxy disabled): S3's breaker, critical-tier checkpoint and critical
  recovery point alerts fire, read from Prometheus's alerts API, and none of them for the
  local folder;
- every query of deploy/grafana/wedsync-replicator.json (Grafana's variables replaced with
  each destination and a rate interval) is accepted by Prometheus and returns series;
- S3 back: its breaker alert resolves;
- the service stopped: WedsyncReplicatorDown fires.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicator.devstack.stack import Stack
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import destinations, sink_environ, with_destinations
from tests.integration.capture_helpers import make_config, setup_schema, wait_for
from tests.integration.faults import free_port, store_through, toxiproxy
from tests.integration.test_archive_faults import (
    Workload,
    kill_quietly,
    stop_gracefully,
    tail,
    wait_for_slot,
)
from tests.integration.test_sink_rebalance import start_service, write_run_config
from tests.unit.test_alert_rules import JOB, PROMETHEUS, RULES
from tests.unit.test_deploy_files import dashboard_queries

#: What replaces the rules' `for:` here, so the test need not wait minutes for each alert.
SHORT_FOR = "2s"
#: The alerts a destination's store outage must raise, for that destination only.
OUTAGE_ALERTS = {"WedsyncSinkBreakerOpen", "WedsyncCriticalCheckpointStalled",
                 "WedsyncCriticalRecoveryPoint"}


class Prometheus:
    """A Prometheus server of the test's own on 127.0.0.1:`port`, and its HTTP API."""

    def __init__(self, config: Path, data: Path, log: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary is not None, (
            "prometheus is missing: `make install` installs it (Debian's `prometheus` "
            "package: apt-get install --no-install-recommends prometheus)")
        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:  # a refused query answers 400 with its error
            raise AssertionError(f"GET {path} {params}: HTTP {exc.code} "
                                 f"{exc.read().decode(errors='replace')[:500]}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def answers(self) -> bool:
        """Whether the server is up and ready (its `/-/ready`)."""
        assert self.process.poll() is None, tail(self.log)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                        timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    async def ready(self) -> None:
        async def answers() -> bool:
            return await asyncio.to_thread(self.answers)
        await wait_for(answers, within=60, what="Prometheus to be ready")

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await asyncio.to_thread(self.get, "/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def firing(self) -> set[tuple[str, str]]:
        """The alerts firing now: (alert name, destination label or "")."""
        data = await asyncio.to_thread(self.get, "/api/v1/alerts")
        return {(a["labels"]["alertname"], a["labels"].get("destination", ""))
                for a in data["alerts"] if a["state"] == "firing"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def short_rules(path: Path) -> Path:
    """A copy of alerts.yml with every `for:` cut to `SHORT_FOR`, the expressions unchanged."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def prometheus_config(path: Path, rules: Path, service_port: int) -> Path:
    """deploy/prometheus/prometheus.yml at a 1 s pace, on *rules*, scraping the service."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    config["scrape_configs"] = [job]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def concrete(expr: str, destination: str) -> str:
    """A dashboard query with Grafana's variables replaced as Grafana would."""
    for variable in ("${destination}", "$destination"):
        expr = expr.replace(variable, destination)
    for variable in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(variable, "10s")
    assert "$" not in expr, expr
    return expr


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])
async def test_store_outage_fires_its_alerts_and_the_dashboard_queries_run(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        s3_target: StoreTarget, dev_stack: Stack) -> None:
    setup_schema(pg_dsn)
    with toxiproxy(dev_stack) as proxies:
        proxy, s3 = store_through(proxies, s3_target)
        dests = destinations(tmp_path, s3)  # "local" (a folder) and "s3" through the proxy
        names = [d.name for d in dests]
        config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
        port = free_port()
        cfg = write_run_config(tmp_path / "replicator.toml", config, port)
        log = tmp_path / "run.log"
        rules = short_rules(tmp_path / "alerts.yml")
        prom_config = prometheus_config(tmp_path / "prometheus.yml", rules, port)
        (tmp_path / "tsdb").mkdir()
        load = Workload(pg_dsn, pause_s=0.1)
        stop = asyncio.Event()
        load_task: asyncio.Task[None] | None = None
        service = start_service(cfg, log, sink_environ())
        prometheus: Prometheus | None = None

        def alive() -> None:
            assert service.poll() is None, tail(log)

        try:
            prometheus = Prometheus(prom_config, tmp_path / "tsdb", tmp_path / "prometheus.log")
            prom = prometheus
            await prom.ready()
            await wait_for_slot(pg_dsn, config.source.slot, alive)
            load_task = asyncio.create_task(load.run(stop))

            async def checkpoints_move() -> bool:  # as Prometheus sees them
                alive()
                moving = await prom.query(
                    'changes(wedsync_sink_checkpoint_lsn{tier="critical"}[15s]) > 0')
                return {r["metric"]["destination"] for r in moving} == set(names)
            await wait_for(checkpoints_move, within=120,
                           what="both destinations' checkpoints moving in Prometheus")
            assert await prom.query(f'up{{job="{JOB}"}} == 1')
            await asyncio.sleep(5)  # a few evaluations with both stores answering
            firing = await prom.firing()
            assert not {a for a in firing if a[0] in OUTAGE_ALERTS}, firing

            proxy.disable()  # S3's store is out

            async def outage_alerts() -> bool:
                alive()
                firing = await prom.firing()
                assert not {(a, "local") for a in OUTAGE_ALERTS} & firing, firing
                return {(a, "s3") for a in OUTAGE_ALERTS} <= firing
            await wait_for(outage_alerts, within=240,
                           what=f"{sorted(OUTAGE_ALERTS)} firing for destination s3")

            # The dashboard's queries, while the alerts fire (one panel lists them).
            served = {r["metric"]["destination"] for r in await prom.query(
                "count by (destination) (wedsync_sink_checkpoint_lsn)")}
            assert served == set(names)  # the dashboard's `destination` variable
            for expr in dashboard_queries():
                for name in names if "destination" in expr else names[:1]:
                    query = concrete(expr, name)
                    assert await prom.query(query), f"no series for {query}"

            proxy.enable()  # S3 is back

            async def breaker_alert_resolved() -> bool:
                alive()
                return ("WedsyncSinkBreakerOpen", "s3") not in await prom.firing()
            await wait_for(breaker_alert_resolved, within=240,
                           what="S3's breaker alert to resolve once the store is back")
            stop.set()
            await load_task
            await stop_gracefully(service, log)

            async def down_alert() -> bool:
                return ("WedsyncReplicatorDown", "") in await prom.firing()
            await wait_for(down_alert, within=60, what="WedsyncReplicatorDown")
        finally:
            stop.set()
            if load_task is not None and not load_task.done():
                load_task.cancel()
                await asyncio.gather(load_task, return_exceptions=True)
            kill_quietly(service)
            if prometheus is not None:
                prometheus.stop()
