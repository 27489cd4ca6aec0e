"""Incident detection (replicator/ops/incidents.py) in a live `replicator run` against real
Postgres, Kafka and a local-folder destination, with a local HTTP receiver as the webhook:
ordinary edits raise nothing; a bulk delete of a critical wedding's guests raises exactly one
incident, recorded in the archive with its impact report, counted in the metrics, and sent
once to the webhook with that wedding's impact."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from replicator.config import IncidentsConfig, NotifyConfig
from tests.integration.archive_helpers import destinations, sink_environ, with_destinations
from tests.integration.capture_helpers import make_config, setup_schema, wait_for
from tests.integration.sink_helpers import NO_COMPACTION
from tests.integration.test_archive_faults import (
    closed_port,
    kill_quietly,
    stop_gracefully,
    tail,
    wait_for_slot,
)
from tests.integration.test_sink_rebalance import start_service, write_run_config

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])

TOKEN = "s3cr3t-hook-token"


async def test_bulk_delete_raises_one_incident(pg_dsn: str, kafka_bootstrap: str,
                                               topic_prefix: str, tmp_path: Path) -> None:
    setup_schema(pg_dsn)  # wedding 1 in three days: critical
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # Deletes travel with their wedding only with the whole old row (priority.py).
        conn.execute("ALTER TABLE guests REPLICA IDENTITY FULL")
        conn.execute("INSERT INTO guests (id, wedding_id, name) SELECT g, 1, 'guest ' || g "
                     "FROM generate_series(1, 40) g")
        conn.execute("INSERT INTO guests (id, wedding_id, name) SELECT g, 2, 'guest ' || g "
                     "FROM generate_series(100, 139) g")
    calls: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = closed_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    dests = tuple(d.model_copy(update={"compaction": NO_COMPACTION})
                  for d in destinations(tmp_path))
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    config = config.model_copy(update={
        "incidents": IncidentsConfig(window_s=60, min_rows=10, share=0.2, impact_wait_s=60),
        "notify": (NotifyConfig(url=f"http://127.0.0.1:{port}/hook?token={TOKEN}"),)})
    metrics_port = closed_port()
    cfg = write_run_config(tmp_path / "replicator.toml", config, metrics_port)
    log = tmp_path / "run.log"
    proc = start_service(cfg, log, sink_environ())

    def alive() -> None:
        assert proc.poll() is None, tail(log)

    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        await asyncio.sleep(4)  # the watcher joins its group and reads from the newest
        # Ordinary work: the same few guests of wedding 1 edited again and again.
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for n in range(24):
                conn.execute("UPDATE guests SET name = %s WHERE id = %s",
                             (f"edit {n}", 1 + n % 3))
                await asyncio.sleep(0.25)
        await asyncio.sleep(3)
        alive()
        assert calls == []
        # A bulk delete of half of wedding 1's guests; and of wedding 2's (normal tier,
        # not watched).
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM guests WHERE wedding_id = 1 AND id > 20")
            conn.execute("DELETE FROM guests WHERE wedding_id = 2 AND id > 110")

        async def called() -> bool:
            alive()
            return bool(calls)
        await wait_for(called, within=120, what="the webhook call")
        await asyncio.sleep(5)  # no second call: the cooldown
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode())
        await stop_gracefully(proc, log)
    finally:
        kill_quietly(proc)
        await runner.cleanup()
    assert len(calls) == 1, calls
    incident, report = calls[0]["incident"], calls[0]["impact"]
    assert incident["wedding"] == "1" and incident["tier"] == "critical"
    # Raised as soon as the rule held (possibly before every deleted row was read).
    assert incident["rows_touched"] >= 10 and incident["share"] >= 0.2
    assert incident["rows_before"] <= 40
    # The impact report covers the whole window: all 20 deletes, wedding 1 only.
    assert report is not None and [w["wedding_id"] for w in report["weddings"]] == ["1"], report
    assert report["weddings"][0]["tables"]["public.guests"]["deletes"] == 20, report
    assert "wedsync_incidents_total 1.0" in text
    archived = sorted(p.name for p in (tmp_path / "archive" / "incidents").glob("*.json"))
    assert archived == [f"{incident['id']}-impact.json", f"{incident['id']}.json"]
    assert TOKEN not in log.read_text(errors="replace")
    assert json.dumps(calls).count('"wedding": "2"') == 0
