"""The reference of `benchmarks.capture`: Debezium's PostgreSQL connector on Kafka Connect.

Kafka Connect runs standalone (`ConnectStandalone`, what `bin/connect-standalone.sh` runs,
with its default heap `-Xms256M -Xmx2G`) against the local broker, with the jars of
`benchmarks/debezium/pom.xml` fetched from Maven Central into the dev cache on first use.
The connector drains a pgoutput slot the benchmark created beside the others, so it reads the
same WAL (`snapshot.mode=no_data`, the existing publication and slot). Its settings are the
documented defaults except:

- JSON converters without schemas (`schemas.enable=false`): the cheapest encoding Connect
  offers (Confluent's Avro converter is not on Maven Central), which favours Debezium;
- `tombstones.on.delete=false`, so one change is one message, as in ours;
- topics created by Connect with the partition count of ours (`topic.creation.default.*`);
- offsets flushed every second (standalone's default is a minute), which costs it a little.

Throughput is measured from the outside, as for ours: the CreateTime of the first and the
last message in its topics (the producer's clock, taken as each message is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from psycopg.conninfo import conninfo_to_dict

POM = Path(__file__).with_name("debezium") / "pom.xml"
DEBEZIUM_VERSION = "3.6.1.Final"
HEAP = ["-Xms256M", "-Xmx2G"]  # bin/connect-standalone.sh's default
LOG4J = """\
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.console.type=Console
appender.console.name=STDOUT
appender.console.layout.type=PatternLayout
appender.console.layout.pattern=[%d] %p %m (%c)%n
logger.streaming.name=io.debezium.connector.postgresql.PostgresStreamingChangeEventSource
logger.streaming.level=INFO
"""


def install(cache_dir: Path) -> Path:
    """The folder of Kafka Connect's and Debezium's jars, fetched with Maven if missing."""
    libs = cache_dir / f"debezium-{DEBEZIUM_VERSION}" / "libs"
    done = libs / ".complete"
    if done.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None or shutil.which("java") is None:
        raise RuntimeError("debezium: Java 17+ and Maven are needed to fetch and run Kafka "
                           "Connect (apt-get install openjdk-17-jre-headless maven)")
    shutil.rmtree(libs, ignore_errors=True)
    libs.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(POM, libs.parent / "pom.xml")
    result = subprocess.run(
        [mvn, "-B", "-q", "-f", str(libs.parent / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
        capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(libs.glob("debezium-connector-postgres-*.jar")):
        raise RuntimeError("debezium: fetching Kafka Connect and Debezium with Maven failed:\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    done.write_text(DEBEZIUM_VERSION + "\n")
    return libs


@dataclass
class Run:
    """One Debezium run: messages in Kafka, the first and last CreateTime (seconds), the
    process's CPU seconds and peak RSS, and its start-up (process start to first message)."""

    messages: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    startup_s: float


def _properties(values: dict[str, Any]) -> str:
    return "".join(f"{k}={v}\n" for k, v in values.items())


def _proc_stats(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and peak RSS in MB of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cpu, peak


async def _topic_partitions(admin: AIOKafkaAdminClient, prefix: str) -> list[TopicPartition]:
    # Table topics only: `<prefix>.message` holds the logical decoding messages other
    # clients emitted into the same WAL (our capture's heartbeats).
    topics = [t for t in await admin.list_topics() if t.startswith(prefix + ".public.")]
    if not topics:
        return []
    described = await admin.describe_topics(topics)
    return [TopicPartition(d["topic"], p["partition"]) for d in described
            for p in d["partitions"]]


async def first_and_last(consumer: AIOKafkaConsumer, tps: list[TopicPartition]
                         ) -> tuple[int, float, float]:
    """Messages in *tps*, and the CreateTime (seconds) of the first and the last of them.
    *consumer*: started, without a group; its assignment is replaced."""
    ends = await consumer.end_offsets(tps)
    starts = await consumer.beginning_offsets(tps)
    consumer.assign([tp for tp in tps if ends[tp] > starts[tp]])
    first, last = float("inf"), 0.0
    for tp in tps:
        if ends[tp] <= starts[tp]:
            continue
        consumer.seek(tp, starts[tp])
        first = min(first, (await consumer.getone(tp)).timestamp / 1000)
        consumer.seek(tp, ends[tp] - 1)
        last = max(last, (await consumer.getone(tp)).timestamp / 1000)
    return sum(ends[tp] - starts[tp] for tp in tps), first, last


@contextlib.asynccontextmanager
async def kafka_clients(bootstrap: str
                        ) -> AsyncIterator[tuple[AIOKafkaAdminClient, AIOKafkaConsumer]]:
    """An admin client and a consumer without a group, for one whole measurement (aiokafka's
    consumer can raise CancelledError when stopped right after it started)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    try:
        await consumer.start()
        try:
            yield admin, consumer
        finally:
            await consumer.stop()
    finally:
        await admin.close()


def _start(libs: Path, work: Path, dsn: str, bootstrap: str, *, slot: str,
           publication: str, prefix: str, partitions: int
           ) -> tuple[subprocess.Popen[bytes], IO[bytes], float]:
    """Write Kafka Connect's and the connector's settings into *work* and start it."""
    params = conninfo_to_dict(dsn)
    work.mkdir(parents=True, exist_ok=True)
    (work / "log4j2.properties").write_text(LOG4J)
    (work / "worker.properties").write_text(_properties({
        "bootstrap.servers": bootstrap,
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "offset.storage.file.filename": work / "offsets",
        "offset.flush.interval.ms": 1000,
        "listeners": "http://127.0.0.1:0",
        "plugin.path": "",
    }))
    (work / "connector.properties").write_text(_properties({
        "name": prefix,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": 1,
        "database.hostname": params.get("host", "127.0.0.1"),
        "database.port": params.get("port", 5432),
        "database.user": params.get("user", "postgres"),
        "database.password": params.get("password", ""),
        "database.dbname": params["dbname"],
        "topic.prefix": prefix,
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": publication,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "tombstones.on.delete": "false",
        "topic.creation.default.replication.factor": 1,
        "topic.creation.default.partitions": partitions,
    }))
    log = (work / "connect.log").open("wb")
    started = time.time()
    process = subprocess.Popen(
        ["java", *HEAP, f"-Dlog4j2.configurationFile={work / 'log4j2.properties'}",
         "-cp", f"{libs}/*", "org.apache.kafka.connect.cli.ConnectStandalone",
         str(work / "worker.properties"), str(work / "connector.properties")],
        stdout=log, stderr=subprocess.STDOUT)
    return process, log, started


async def run(libs: Path, work: Path, dsn: str, bootstrap: str, *, slot: str,
              publication: str, prefix: str, changes: int, partitions: int,
              timeout_s: float) -> Run:
    """Run Kafka Connect with the connector until *changes* messages are in Kafka under
    *prefix*; stop it and return what it did. The slot is left to the caller to drop."""
    process, log, started = _start(libs, work, dsn, bootstrap, slot=slot,
                                   publication=publication, prefix=prefix,
                                   partitions=partitions)
    try:
        async with kafka_clients(bootstrap) as (admin, consumer):
            deadline = time.monotonic() + timeout_s
            tps: list[TopicPartition] = []
            seen = cpu = peak = 0.0
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"Kafka Connect exited with {process.returncode}; see "
                                       f"{work / 'connect.log'}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Debezium wrote {seen:.0f} of {changes} messages "
                                       f"within {timeout_s:.0f}s; see {work / 'connect.log'}")
                tps = await _topic_partitions(admin, prefix)
                seen = sum((await consumer.end_offsets(tps)).values()) if tps else 0
                if seen >= changes:
                    cpu, peak = _proc_stats(process.pid)
                    break
                await asyncio.sleep(0.5)
            messages, first, last = await first_and_last(consumer, tps)
            with contextlib.suppress(Exception):
                await admin.delete_topics([t for t in await admin.list_topics()
                                           if t.startswith(prefix + ".")])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    return Run(messages=messages, seconds=last - first, cpu_s=cpu, peak_rss_mb=peak,
               startup_s=first - started)
