"""The local stack as a whole: every service, started together and stopped together.

Services start concurrently (Kafka's JVM dominates a warm start), each waiting for its own
readiness. If one fails, the error names it with its log tail; the services that did start
keep running, so `replicator dev status` shows what is up and `down` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Iterable, Iterator, Sequence

from replicator.devstack.base import Health, Service, ServiceError
from replicator.devstack.kafka import KafkaService
from replicator.devstack.objectstores import AzuriteService, FakeGcsService, MotoS3Service
from replicator.devstack.postgres import PostgresService
from replicator.devstack.settings import StackSettings
from replicator.devstack.toxiproxy import ToxiproxyService

SERVICE_NAMES = ("pg15", "pg18", "kafka", "s3", "azure", "gcs", "toxiproxy")


class StackError(ServiceError):
    """One or more services failed; `failures` maps each service name to its error."""

    def __init__(self, failures: dict[str, BaseException]) -> None:
        self.failures = failures
        body = "\n\n".join(f"[{name}] {exc}" for name, exc in failures.items())
        super().__init__(f"{len(failures)} service(s) failed to start: "
                         f"{', '.join(failures)}\n\n{body}")


class Stack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.services: dict[str, Service] = {
            "pg15": PostgresService(settings, "15"),
            "pg18": PostgresService(settings, "18"),
            "kafka": KafkaService(settings),
            "s3": MotoS3Service(settings),
            "azure": AzuriteService(settings),
            "gcs": FakeGcsService(settings),
            "toxiproxy": ToxiproxyService(settings),
        }

    def select(self, names: Iterable[str] | None = None) -> list[Service]:
        if names is None:
            return list(self.services.values())
        chosen = []
        for name in names:
            if name not in self.services:
                choices = ", ".join(self.services)
                raise ServiceError(f"unknown service {name!r}; choose from {choices}")
            chosen.append(self.services[name])
        return chosen

    def install(self, names: Iterable[str] | None = None) -> None:
        """Fetch every managed service's binaries (apt, Maven, npm, go) without starting
        anything."""
        for service in self.select(names):
            if service.managed:
                service.install()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` at a time per state directory: two test sessions starting the
        stack together must not both spawn a service and overwrite each other's PID file."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.settings.state_dir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    async def up(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Start the services (idempotent); returns what happened to each."""
        with self._locked():
            return await self._up(names)

    async def _up(self, names: Iterable[str] | None) -> dict[str, str]:
        services = self.select(names)
        # Installs run one at a time: apt, Maven, npm and go each saturate the two cores.
        for service in services:
            if service.managed and service.pid() is None:
                await asyncio.to_thread(service.install)
        results = await asyncio.gather(*(s.start() for s in services), return_exceptions=True)
        failures = {s.name: r for s, r in zip(services, results, strict=True)
                    if isinstance(r, BaseException)}
        if failures:
            raise StackError(failures)
        return {s.name: str(r) for s, r in zip(services, results, strict=True)}

    def down(self, names: Iterable[str] | None = None) -> dict[str, bool]:
        """Stop the managed services; returns which were running."""
        with self._locked():
            return {s.name: s.stop() for s in self.select(names)}

    async def status(self, names: Sequence[str] | None = None) -> list[Health]:
        return list(await asyncio.gather(*(s.health() for s in self.select(names))))

    def exports(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for service in self.services.values():
            env.update(service.exports())
        return env
