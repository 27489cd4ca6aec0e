"""One service of the local stack: install, start, wait until it answers, stop.

A service is either *managed* (we run it natively under the state directory) or *external*
(a `REPLICATOR_DEV_*` variable names an already-running instance, e.g. from docker compose);
an external one is only probed, never started or stopped.

Readiness and health are the same check: `probe()` speaks the service's real protocol
(a SQL query, a Kafka metadata request, an object-store listing), so "healthy" means a client
of ours would work, not merely that a port is open.
"""

from __future__ import annotations

import asyncio
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from replicator.devstack import process
from replicator.devstack.settings import EXTERNAL_VARS, StackSettings
from replicator.errors import ReplicatorError

State = Literal["healthy", "unhealthy", "stopped"]


class ServiceError(ReplicatorError):
    """A service could not be installed, started or reached; the message says which and why."""


@dataclass(frozen=True)
class Launch:
    """How to run a managed service."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    user: str | None = None


@dataclass(frozen=True)
class Health:
    name: str
    address: str
    state: State
    mode: Literal["native", "external"]
    detail: str = ""
    pid: int | None = field(default=None)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "address": self.address,
            "state": self.state,
            "mode": self.mode,
            "pid": self.pid,
            "detail": self.detail,
        }


class Service(ABC):
    #: Short name, also the key in `StackSettings.ports` and `EXTERNAL_VARS`.
    name: str
    start_timeout: float = 60.0
    stop_signal: int = 15  # SIGTERM
    stop_timeout: float = 30.0
    probe_timeout: float = 5.0

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.external: str | None = settings.external.get(self.name)

    # --- what each service defines -------------------------------------------------------

    @abstractmethod
    def address(self) -> str:
        """Where clients connect (a DSN, host:port or URL); the same form as its env variable."""

    @abstractmethod
    async def probe(self) -> None:
        """Speak the real protocol once; raise if the service does not answer correctly."""

    @abstractmethod
    def launch(self) -> Launch:
        """The command line of the managed service (called after `prepare`)."""

    def install(self) -> None:  # noqa: B027 - optional hook
        """Fetch what the service needs into the cache (idempotent, may take a while)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Create the service's state on first start (initdb, storage format, ...)."""

    def exports(self) -> dict[str, str]:
        """Environment variables that make clients (and the tests) use this service."""
        return {EXTERNAL_VARS[self.name]: self.address()}

    # --- shared lifecycle ----------------------------------------------------------------

    @property
    def managed(self) -> bool:
        return self.external is None

    @property
    def port(self) -> int:
        return self.settings.ports[self.name]

    @property
    def home(self) -> Path:
        return self.settings.state_dir / self.name

    @property
    def log_file(self) -> Path:
        return self.settings.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.settings.state_dir / "pids" / f"{self.name}.pid"

    def pid(self) -> int | None:
        return process.read_pid(self.pid_file) if self.managed else None

    async def start(self) -> str:
        """Start (or adopt) the service and wait until it answers. Returns what was done."""
        if not self.managed:
            await self.wait_ready(self.start_timeout)
            return "external"
        if self.pid() is not None:
            await self.wait_ready(self.start_timeout)
            return "already running"
        await asyncio.to_thread(self.install)
        self._check_port_free()
        await asyncio.to_thread(self.prepare)
        spec = self.launch()
        process.spawn(spec.argv, log_file=self.log_file, pid_file=self.pid_file, cwd=spec.cwd,
                      env=spec.env, user=spec.user)
        await self.wait_ready(self.start_timeout)
        return "started"

    async def wait_ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        last = "no answer yet"
        while True:
            try:
                await asyncio.wait_for(self.probe(), self.probe_timeout)
                return
            except (TimeoutError, OSError, ServiceError, Exception) as exc:
                last = f"{type(exc).__name__}: {exc}".strip()
            if self.managed and self.pid() is None:
                raise ServiceError(
                    f"{self.name} exited during start-up (last check: {last}); "
                    f"tail of {self.log_file}:\n{process.log_tail(self.log_file)}"
                )
            if time.monotonic() >= deadline:
                where = f"log {self.log_file}" if self.managed else "external service"
                tail = f":\n{process.log_tail(self.log_file)}" if self.managed else ""
                raise ServiceError(
                    f"{self.name} at {self.address()} was not ready within {within:.0f}s "
                    f"(last check: {last}); see {where}{tail}"
                )
            await asyncio.sleep(0.25)

    def stop(self) -> bool:
        """Stop the managed service; True if it was running. External services are left alone."""
        if not self.managed:
            return False
        return process.stop(self.pid_file, sig=self.stop_signal, timeout=self.stop_timeout)

    async def health(self) -> Health:
        mode: Literal["native", "external"] = "native" if self.managed else "external"
        pid = self.pid()
        if self.managed and pid is None:
            return Health(self.name, self.address(), "stopped", mode, "not running")
        try:
            await asyncio.wait_for(self.probe(), self.probe_timeout)
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}".strip()
            return Health(self.name, self.address(), "unhealthy", mode, detail, pid)
        return Health(self.name, self.address(), "healthy", mode, "", pid)

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                var = f"REPLICATOR_DEV_{self.name.upper()}_PORT"
                raise ServiceError(
                    f"{self.name}: port 127.0.0.1:{self.port} is already in use by a process "
                    f"this stack did not start; stop it, or choose another port with {var}"
                )
