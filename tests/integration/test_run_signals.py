"""`replicator run` stopped with SIGTERM while it is still starting (loading its modules and
configuration, before its event loop handles signals) stops cleanly, exit 0, instead of being
killed by the signal's default action (as a supervisor or a fault test may stop it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.capture_helpers import make_config, setup_schema
from tests.integration.test_archive_faults import closed_port
from tests.integration.test_sink_rebalance import write_run_config

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])


@pytest.mark.parametrize("delay_s", [0.05, 0.3, 1.5])
def test_sigterm_while_starting_stops_cleanly(pg_dsn: str, kafka_bootstrap: str,
                                              topic_prefix: str, tmp_path: Path,
                                              delay_s: float) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    cfg = write_run_config(tmp_path / "replicator.toml", config, closed_port())
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "replicator", "run", "--only",
                                 "capture", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text(errors="replace")[-3000:]
