"""Real faults for the tests: a small client for Toxiproxy's HTTP API (the local stack's
`toxiproxy` service), and proxies in front of Postgres, each object store and a Kafka broker.

Every proxy gets a unique name and listens on a free port of 127.0.0.1; `Toxiproxy` deletes
the proxies it created when it is closed, so tests sharing the server never see each other's.
A test points its client at `proxy.listen` and then injects, while the pipeline runs:

- `proxy.toxic("latency", latency=300, jitter=100)`: added delay (ms), per direction;
- `proxy.toxic("reset_peer", timeout=0, toxicity=0.5)`: connections reset (TCP RST);
- `proxy.toxic("timeout", timeout=0)`: data stops, the connection hangs;
- `proxy.toxic("slicer", ...)`, `("limit_data", bytes=...)`, `("bandwidth", rate=...)`;
- `proxy.down()` (a context manager) or `disable()`/`enable()`: an outage; the open
  connections are cut and new ones refused, on the same port afterwards.

Postgres (`postgres_through`) and the object stores (`store_through`: moto S3, Azurite and
fake-gcs-server speak plain HTTP and keep working behind a proxy) take the proxy's address
like any other. Kafka does not: a client bootstraps through the address it is given and then
connects to the address each broker *advertises*. The shared broker advertises its own port,
so clients would go round a proxy in front of it. `kafka_through` therefore starts a second,
throwaway broker (the stack's jars, its own state directory and ports) whose advertised
listener is the proxy's address, so every connection to it crosses the proxy; faults of the
shared broker itself are limited to restarting it (`test_capture_faults`).

Restarting a server the other tests share would break them, so the restarts get servers of
their own: `broker_through` yields a `Broker` (the throwaway broker above, with `stop()`,
`start()` and `restart()`), and `postgres_of_its_own` a `PostgresServer`, a throwaway
PostgreSQL 15 (the stack's binaries and settings, its own data directory and port, removed
afterwards) whose `stop()` is a real fast shutdown (SIGINT to the postmaster) and `start()`
a start on the same data directory, waiting until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from replicator.devstack.kafka import KafkaService
from replicator.devstack.postgres import PostgresService
from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import Stack
from tests.conftest import StoreTarget


class ToxiproxyError(RuntimeError):
    """The API refused a call; the message holds its status and answer."""


@dataclass
class Proxy:
    """One proxy: clients connect to `listen`, which forwards to `upstream`."""

    api: Toxiproxy
    name: str
    listen: str
    upstream: str

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def toxic(self, kind: str, *, stream: str = "downstream", toxicity: float = 1.0,
              **attributes: Any) -> str:
        """Add a toxic of *kind* with *attributes*; returns its name (for `remove`)."""
        name = f"{kind}_{stream}_{uuid.uuid4().hex[:6]}"
        self.api.call("POST", f"/proxies/{self.name}/toxics",
                      {"name": name, "type": kind, "stream": stream, "toxicity": toxicity,
                       "attributes": attributes})
        return name

    def remove(self, toxic: str) -> None:
        self.api.call("DELETE", f"/proxies/{self.name}/toxics/{toxic}")

    def toxics(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api.call("GET", f"/proxies/{self.name}/toxics")
        return found

    @contextlib.contextmanager
    def with_toxic(self, kind: str, **options: Any) -> Iterator[str]:
        name = self.toxic(kind, **options)
        try:
            yield name
        finally:
            self.remove(name)

    def disable(self) -> None:
        """An outage: open connections are cut, new ones refused."""
        self.api.call("POST", f"/proxies/{self.name}", {"enabled": False})

    def enable(self) -> None:
        self.api.call("POST", f"/proxies/{self.name}", {"enabled": True})

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        self.disable()
        try:
            yield
        finally:
            self.enable()


class Toxiproxy:
    """The HTTP API at *api* (`http://127.0.0.1:8474`); a context manager that deletes the
    proxies it created."""

    def __init__(self, api: str) -> None:
        self.api = api.rstrip("/")
        self.created: list[str] = []

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.api}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise ToxiproxyError(f"{method} {path}: HTTP {exc.code} "
                                 f"{exc.read().decode(errors='replace')[:300]}") from None
        return json.loads(text) if text else None

    def version(self) -> str:
        request = urllib.request.Request(f"{self.api}/version")
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode()).strip()

    def proxy(self, upstream: str, label: str, listen: str = "127.0.0.1:0") -> Proxy:
        """A new proxy to *upstream* (`host:port`) named `<label>-<random>`, listening on
        *listen* (by default a free port the server picks)."""
        name = f"{label}-{uuid.uuid4().hex[:10]}"
        made = self.call("POST", "/proxies", {"name": name, "listen": listen,
                                              "upstream": upstream, "enabled": True})
        self.created.append(name)
        return Proxy(self, name, str(made["listen"]), upstream)

    def close(self) -> None:
        for name in self.created:
            with contextlib.suppress(ToxiproxyError):
                self.call("DELETE", f"/proxies/{name}")
        self.created.clear()

    def __enter__(self) -> Toxiproxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def toxiproxy(stack: Stack) -> Toxiproxy:
    """A client of the stack's Toxiproxy."""
    return Toxiproxy(stack.services["toxiproxy"].address())


def postgres_through(proxies: Toxiproxy, dsn: str) -> tuple[Proxy, str]:
    """A proxy in front of the server of *dsn*, and the same DSN through it."""
    params = conninfo_to_dict(dsn)
    host, port = params.get("host") or "127.0.0.1", params.get("port") or "5432"
    proxy = proxies.proxy(f"{host}:{port}", "pg")
    return proxy, make_conninfo(dsn, host=proxy.host, port=str(proxy.port))


def store_through(proxies: Toxiproxy, target: StoreTarget) -> tuple[Proxy, StoreTarget]:
    """A proxy in front of *target*'s emulator, and the same bucket through it."""
    parts = urlsplit(target.endpoint)
    proxy = proxies.proxy(parts.netloc, target.kind)
    endpoint = urlunsplit(parts._replace(netloc=proxy.listen))
    return proxy, dataclasses.replace(target, endpoint=endpoint)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class AdvertisedKafka(KafkaService):
    """The stack's broker, advertising *advertised* (a proxy's address) to its clients."""

    def __init__(self, settings: StackSettings, advertised: str) -> None:
        super().__init__(settings)
        self.advertised = advertised

    def advertised_listener(self) -> str:
        return self.advertised

    def address(self) -> str:
        return self.advertised


class _Throwaway:
    """Stop, start and restart of a throwaway server of the stack's own (its `service`):
    `stop` ends it (a broker on SIGTERM, PostgreSQL with a fast shutdown) and returns once
    the process is gone; `start` starts it again on the same state and ports and returns
    once it answers."""

    service: KafkaService | PostgresService
    what: str

    async def stop(self) -> None:
        stopped = await asyncio.to_thread(self.service.stop)
        assert stopped, f"the throwaway {self.what} was not running"

    async def start(self) -> None:
        await self.service.start()

    async def restart(self, down_s: float = 1.0) -> None:
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()


@dataclass
class Broker(_Throwaway):
    """A throwaway broker behind `proxy`; clients bootstrap from `bootstrap`."""

    proxy: Proxy
    bootstrap: str
    service: KafkaService
    what: str = "broker"


@contextlib.asynccontextmanager
async def broker_through(proxies: Toxiproxy, stack: Stack, state_dir: Path
                         ) -> AsyncIterator[Broker]:
    """A throwaway one-node broker under *state_dir* behind a new proxy, which is also the
    address the broker advertises. The broker is stopped, with its process group, on the
    way out."""
    broker_port = free_port()
    proxy = proxies.proxy(f"127.0.0.1:{broker_port}", "kafka")
    base = stack.settings
    settings = StackSettings(
        state_dir=state_dir, cache_dir=base.cache_dir,
        ports={**base.ports, "kafka": broker_port, "kafka_controller": free_port()})
    broker = AdvertisedKafka(settings, proxy.listen)
    try:
        await broker.start()
        yield Broker(proxy, proxy.listen, broker)
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def kafka_through(proxies: Toxiproxy, stack: Stack, state_dir: Path
                        ) -> AsyncIterator[tuple[Proxy, str]]:
    """`broker_through`, yielding the proxy and the bootstrap address only."""
    async with broker_through(proxies, stack, state_dir) as broker:
        yield broker.proxy, broker.bootstrap


@dataclass
class PostgresServer(_Throwaway):
    """A throwaway PostgreSQL server; `dsn` names its database `postgres`."""

    service: PostgresService
    what: str = "PostgreSQL server"

    @property
    def dsn(self) -> str:
        return self.service.address()


@contextlib.asynccontextmanager
async def postgres_of_its_own(stack: Stack, state_dir: Path) -> AsyncIterator[PostgresServer]:
    """A PostgreSQL 15 server of its own under *state_dir* (as root, its data directory is
    under /var/tmp, see `replicator.devstack.postgres`), on a free port; stopped and its
    data removed on the way out."""
    base = stack.settings
    settings = StackSettings(state_dir=state_dir, cache_dir=base.cache_dir,
                             ports={**base.ports, "pg15": free_port()})
    service = PostgresService(settings, "15")
    try:
        await service.start()
        yield PostgresServer(service)
    finally:
        service.stop()
        if service.server_dir != service.home:  # as root: the directory under /var/tmp
            shutil.rmtree(service.server_dir.parent, ignore_errors=True)
