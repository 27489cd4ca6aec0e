"""`replicator status` against the real stack: a live `replicator run` (capture and sinks,
local folder and S3), then the same service stopped, a dead letter, Kafka unreachable, and a
configuration that cannot be read; each gives the verdict and exit code of the
Nagios/Icinga convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), read from the components
themselves."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from replicator.config import Config, KafkaConfig
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import destinations, sink_environ, with_destinations
from tests.integration.capture_helpers import make_config, setup_schema, wait_for
from tests.integration.sink_helpers import NO_COMPACTION
from tests.integration.test_archive_faults import (
    Workload,
    checkpoint_of,
    closed_port,
    kill_quietly,
    stop_gracefully,
    tail,
    wait_for_slot,
)
from tests.integration.test_sink_rebalance import start_service, write_run_config

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])


def status(config: Path, *args: str, stdout_only: bool = False) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "replicator", "status", "--config",
                           str(config), *args], capture_output=True, text=True,
                          env=sink_environ(), timeout=120, check=False)
    return done.returncode, done.stdout + ("" if stdout_only else done.stderr)


def as_json(config: Path) -> tuple[int, dict[str, Any]]:
    code, out = status(config, "--json", stdout_only=True)
    return code, json.loads(out.strip().splitlines()[-1])


def levels(doc: dict[str, Any], stage: str) -> set[str]:
    return {c["level"] for c in doc["checks"] if c["stage"] == stage}


async def test_status_of_a_live_and_a_stopped_service(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        s3_target: StoreTarget) -> None:
    setup_schema(pg_dsn)
    dests = tuple(d.model_copy(update={"compaction": NO_COMPACTION})
                  for d in destinations(tmp_path, s3_target))
    config: Config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix),
                                       dests)
    port = closed_port()
    cfg = write_run_config(tmp_path / "replicator.toml", config, port)
    log = tmp_path / "run.log"
    proc = start_service(cfg, log, sink_environ())
    load = Workload(pg_dsn)
    stop = asyncio.Event()

    def alive() -> None:
        assert proc.poll() is None, tail(log)

    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        loading = asyncio.create_task(load.run(stop, transactions=60))
        await loading
        from connectors.registry import open_store
        stores = {d.name: open_store(d.url, sink_environ()) for d in dests}
        try:
            async def durable() -> bool:
                alive()
                return all([await checkpoint_of(s, n) > load.end for n, s in stores.items()])
            await wait_for(durable, within=90, what="every destination durable")
        finally:
            for store in stores.values():
                await store.close()

        code, doc = await asyncio.to_thread(as_json, cfg)
        assert code == 0 and doc["verdict"] == "OK", doc
        assert doc["readings"]["service"]["up"] is True
        source = doc["readings"]["source"]
        assert source["active"] is True and source["wal_status"] in ("reserved", "extended")
        assert set(doc["readings"]["destinations"]) == {"local", "s3"}
        for reading in doc["readings"]["destinations"].values():
            assert reading["checkpoint"] != "0/0" and reading["dead_letters"] == []
            assert set(reading["rpo_seconds"]) == {"critical", "high", "normal", "low"}
        assert {w["id"] for w in doc["readings"]["critical_weddings"]} == {"1"}
        code, text = await asyncio.to_thread(status, cfg)
        assert code == 0 and text.startswith("WEDSYNC OK"), text

        await stop_gracefully(proc, log)
        # Down: still read from Postgres, Kafka and the stores.
        code, doc = await asyncio.to_thread(as_json, cfg)
        assert code == 2 and doc["verdict"] == "CRITICAL", doc
        assert levels(doc, "source") == {"CRITICAL"}
        assert doc["readings"]["source"]["active"] is False
        assert doc["readings"]["service"]["up"] is False
        assert all(r["checkpoint"] != "0/0"
                   for r in doc["readings"]["destinations"].values())
        critical = [c for c in doc["checks"] if c["level"] == "CRITICAL"]
        assert all(c["why"] and c["action"] for c in critical)

        # A dead letter in the local destination: CRITICAL there, naming it.
        letter = tmp_path / "archive" / "deadletters" / "t" / "0000000000-00000000000000000001.json"
        letter.parent.mkdir(parents=True)
        letter.write_bytes(b"x")
        code, doc = await asyncio.to_thread(as_json, cfg)
        assert "CRITICAL" in levels(doc, "destination local")
        assert levels(doc, "destination s3") <= {"OK"}

        # Kafka unreachable.
        gone = config.model_copy(update={"kafka": KafkaConfig(
            bootstrap_servers=f"127.0.0.1:{closed_port()}", topic_prefix=topic_prefix)})
        bad = write_run_config(tmp_path / "nokafka.toml", gone, closed_port())
        code, doc = await asyncio.to_thread(as_json, bad)
        assert code == 2 and levels(doc, "kafka") == {"CRITICAL"}

        # A configuration that cannot be read: UNKNOWN, 3, naming the file.
        broken = tmp_path / "broken.toml"
        broken.write_text("[source\n")
        code, text = await asyncio.to_thread(status, broken)
        assert code == 3 and text.startswith("WEDSYNC UNKNOWN") and "broken.toml" in text
        assert "secret" not in text.lower()
    finally:
        stop.set()
        kill_quietly(proc)
