"""Apache Kafka 4.x, one node in KRaft mode, run from jars fetched with Maven.

The jars (`org.apache.kafka:kafka_2.13` and its runtime dependencies, see `kafka/pom.xml`)
are resolved once into `<cache>/kafka-<version>/libs`. The broker runs the two main classes
that the distribution's `kafka-storage.sh format` and `kafka-server-start.sh` run, on the
machine's Java with a small heap. Automatic topic creation is off, as in production: the
replicator creates its topics with the partitions and replication factor it is configured for.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from replicator.devstack.base import Launch, Service, ServiceError

# A fixed cluster id: the stack formats its own storage once; the id only has to be stable.
CLUSTER_ID = "d2Vkc3luYy1yZXBsaWNhdG"
HEAP = ["-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]


def _resource(name: str) -> str:
    return resources.files("replicator.devstack").joinpath("kafka", name).read_text()


def kafka_version() -> str:
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", _resource("pom.xml"))
    assert match, "kafka/pom.xml names no kafka.version"
    return match.group(1)


class KafkaService(Service):
    name = "kafka"
    start_timeout = 90.0
    stop_timeout = 30.0

    def address(self) -> str:
        return self.external or f"127.0.0.1:{self.port}"

    async def probe(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        # aiokafka logs every refused connection at ERROR; while the broker boots, a plain TCP
        # connect says "not yet" quietly.
        host, _, port = self.address().split(",")[0].rpartition(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        await writer.wait_closed()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.address(), request_timeout_ms=3000, client_id="replicator-dev"
        )
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
        finally:
            await admin.close()
        if not cluster.get("brokers"):
            raise ServiceError(f"kafka at {self.address()} reports no brokers")

    @property
    def libs(self) -> Path:
        return self.settings.cache_dir / f"kafka-{kafka_version()}" / "libs"

    def install(self) -> None:
        done = self.libs / ".complete"
        if done.exists():
            return
        mvn = shutil.which("mvn")
        if mvn is None or shutil.which("java") is None:
            raise ServiceError(
                "kafka: Java 17+ and Maven are needed to fetch and run the local broker "
                "(apt-get install openjdk-17-jre-headless maven)"
            )
        work = self.libs.parent
        shutil.rmtree(self.libs, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "pom.xml").write_text(_resource("pom.xml"))
        result = subprocess.run(
            [mvn, "-B", "-q", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
             f"-DoutputDirectory={self.libs}", "-DincludeScope=runtime"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0 or not any(self.libs.glob("kafka_2.13-*.jar")):
            raise ServiceError(
                "kafka: fetching the broker jars with Maven failed:\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        done.write_text(kafka_version() + "\n")

    def prepare(self) -> None:
        data = self.home / "data"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(self._properties(data))
        (self.home / "log4j2.yaml").write_text(_resource("log4j2.yaml"))
        if (data / "meta.properties").exists():
            return
        result = subprocess.run(
            [*self._java(), "kafka.tools.StorageTool", "format", "-t", CLUSTER_ID,
             "-c", str(self.home / "server.properties"), "--ignore-formatted"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise ServiceError(f"kafka: formatting storage failed:\n{result.stdout}{result.stderr}")

    def launch(self) -> Launch:
        return Launch(argv=[*self._java(), "kafka.Kafka", str(self.home / "server.properties")],
                      cwd=self.home)

    def advertised_listener(self) -> str:
        """The `host:port` clients are told to connect to (the fault tests put a proxy's
        address here, on a broker of their own)."""
        return f"127.0.0.1:{self.port}"

    def _java(self) -> list[str]:
        return ["java", *HEAP, "-cp", f"{self.libs}/*",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.yaml'}"]

    def _properties(self, data: Path) -> str:
        controller = self.settings.ports["kafka_controller"]
        return "\n".join([
            "# managed by `replicator dev`",
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller}",
            f"advertised.listeners=PLAINTEXT://{self.advertised_listener()}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={data}",
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "",
        ])
