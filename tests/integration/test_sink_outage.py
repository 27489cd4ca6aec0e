"""A destination's store down under load (its local folder's volume gone): the sink pauses
its partitions once its buffers reach their bound or its breaker opens, so its memory stays
flat, and nothing is lost when the store comes back.

The outage lasts `WEDSYNC_SINK_OUTAGE_S` seconds (60 by default); for ten minutes:
`WEDSYNC_SINK_OUTAGE_S=600 .venv/bin/python -m pytest tests/integration/test_sink_outage.py`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from connectors.registry import open_store
from replicator.config import (
    DestinationConfig,
    KafkaConfig,
)
from tests.integration.archive_helpers import (
    FAST,
    sink_environ,
)
from tests.integration.sink_helpers import (
    NO_COMPACTION,
    archived_ids,
    covered,
    sink_config,
    traffic,
)
from tests.integration.test_archive_faults import (
    kill_quietly,
    start_run,
    stop_gracefully,
    tail,
    write_config,
)

OUTAGE_S = float(os.environ.get("WEDSYNC_SINK_OUTAGE_S", "60"))
#: Changes per second produced during the outage, of about 2 KB each.
RATE = 1000
PAYLOAD = "x" * 2000
#: How much the sink's resident memory may grow once its buffers reached their bound; without
#: the pause it grows with everything produced (about 2.5 MB a second here).
RSS_SLACK_MB = 30

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


# --- a store outage under load ----------------------------------------------------------------


async def test_store_outage_keeps_memory_flat(kafka_bootstrap: str, topic_prefix: str,
                                              tmp_path: Path) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=1)
    root = tmp_path / "archive"
    root.mkdir()
    bound = FAST.model_copy(update={"max_rows": 2000, "max_bytes": 4 * 1024 * 1024})
    dest = DestinationConfig(name="local", url=f"file://{root}", flush=bound,
                             compaction=NO_COMPACTION)
    cfg = write_config(tmp_path / "sink.toml", sink_config(kafka, dest))
    log = tmp_path / "sink.log"
    store = open_store(dest.url, sink_environ())
    samples: list[tuple[float, float]] = []
    sink: subprocess.Popen[bytes] | None = None
    try:
        async with traffic(kafka) as load:
            await load.transaction(5)
            await load.producer.flush()
            sink = start_run(cfg, "sinks", log, sink_environ())
            proc = sink

            def alive() -> None:
                assert proc.poll() is None, tail(log)

            await covered(store, "local", load.end, alive=alive, within=90)
            # The volume goes away: every write fails at once (the root is missing), and the
            # breaker opens. The load goes on.
            away = tmp_path / "archive.unmounted"
            root.rename(away)
            loop = asyncio.get_running_loop()
            started = loop.time()
            while (now := loop.time()) - started < OUTAGE_S:
                for _ in range(RATE // 20):
                    await load.transaction(20, payload=PAYLOAD)
                await load.producer.flush()
                alive()
                samples.append((loop.time() - started, rss_mb(proc.pid)))
                await asyncio.sleep(max(0.0, 1.0 - (loop.time() - now)))
            away.rename(root)
            await covered(store, "local", load.end, alive=alive, within=240)
            await stop_gracefully(proc, log)
            produced = load.ids
    finally:
        kill_quietly(sink)
    try:
        missing = produced - await archived_ids(store)
    finally:
        await store.close()
    assert not missing, f"{len(missing)} of {len(produced)} changes not archived"
    assert len(produced) >= RATE * OUTAGE_S / 2
    settled = [rss for at, rss in samples if at >= OUTAGE_S / 4]
    assert settled and max(settled) - settled[0] < RSS_SLACK_MB, samples
