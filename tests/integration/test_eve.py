"""Eve snapshots (replicator/eve.py) in a live `replicator run` against real Postgres, Kafka
and a local-folder destination: a wedding tomorrow gets one snapshot of its rows, recorded
in the archive (`eves/<wedding>/<date>.json`); a restart does not take it again; a wedding in
three days gets none yet; `replicator status` shows it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pytest

from replicator.archive.layout import EVES, eve_key, parse_part_key, parse_segment_key
from replicator.config import EveConfig
from replicator.crypto import decrypt
from replicator.position import Lsn
from tests.integration.archive_helpers import (
    destinations,
    keyring,
    sink_environ,
    with_destinations,
)
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


async def test_eve_snapshot_taken_once(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str,
                                       tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO weddings VALUES (4, 'Gil & Hal', %s)", (tomorrow,))
        conn.execute("INSERT INTO guests (id, wedding_id, name) SELECT g, 4, 'guest ' || g "
                     "FROM generate_series(1000, 1029) g")
    dests = tuple(d.model_copy(update={"compaction": NO_COMPACTION})
                  for d in destinations(tmp_path))
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    config = config.model_copy(update={"eve": EveConfig(hours_before=24, check_every_s=1)})
    cfg = write_run_config(tmp_path / "replicator.toml", config, closed_port())
    log = tmp_path / "run.log"
    archive = tmp_path / "archive"
    proc = start_service(cfg, log, sink_environ())

    def alive() -> None:
        assert proc.poll() is None, tail(log)

    record = archive / eve_key("4", tomorrow)
    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)

        async def recorded() -> bool:
            alive()
            return record.exists()
        await wait_for(recorded, within=90, what="the eve record in the archive")
        await asyncio.sleep(3)  # several more checks
        await stop_gracefully(proc, log)
        proc = start_service(cfg, log, sink_environ())  # a restart: not taken again
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        await asyncio.sleep(6)
        alive()
        done = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "replicator", "status", "--config", str(cfg), "--json"],
            capture_output=True, text=True, env=sink_environ(), timeout=120, check=False)
        await stop_gracefully(proc, log)
    finally:
        kill_quietly(proc)
    text = log.read_text(errors="replace")
    assert text.count("eve snapshot of wedding 4") == 1, text[-3000:]
    assert "eve snapshot of wedding 1 " not in text  # three days away: not yet
    records = sorted(p.relative_to(archive).as_posix() for p in (archive / EVES).rglob("*.json"))
    assert records == [eve_key("4", tomorrow)]
    # The snapshot's rows are in the archive, at the snapshot's own LSN (in a segment or a
    # part of public.guests whose range reaches it).
    taken = Lsn(json.loads(decrypt(record.read_bytes(), eve_key("4", tomorrow), keyring()))
                ["lsn"])
    assert taken > 0
    covering = [p for p in (archive / "segments" / "public.guests").glob("*.seg")
                if parse_segment_key(p.relative_to(archive).as_posix()).last >= taken]
    covering += [p for p in (archive / "snapshots" / "public.guests").rglob("rows-*.part")
                 if parse_part_key(p.relative_to(archive).as_posix()).lsn == taken]
    assert covering
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    eves = {w["id"]: w.get("eve_snapshot") for w in doc["readings"]["critical_weddings"]}
    assert eves == {"1": False, "4": True}, doc["readings"]["critical_weddings"]
