"""`replicator dev`: lifecycle of real processes, failures, external services, the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict

from replicator.cli import main
from replicator.devstack import process
from replicator.devstack.base import Launch, Service, ServiceError
from replicator.devstack.objectstores import MotoS3Service
from replicator.devstack.settings import EXTERNAL_VARS, StackSettings
from replicator.devstack.stack import SERVICE_NAMES, Stack
from replicator.devstack.toxiproxy import ToxiproxyService
from tests.integration.faults import postgres_through, toxiproxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings(tmp_path: Path, **ports: int) -> StackSettings:
    base = StackSettings.from_env({"HOME": str(tmp_path)}, tmp_path / "state")
    return StackSettings(base.state_dir, base.cache_dir, {**base.ports, **ports}, {})


class Crashing(Service):
    """A service whose process dies at once, as a misconfigured server would."""

    name = "s3"
    start_timeout = 20.0

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def probe(self) -> None:
        raise ServiceError("not answering")

    def launch(self) -> Launch:
        return Launch(["sh", "-c", "echo 'FATAL: bad setting frobnicate=7' >&2; exit 3"])


async def test_a_service_that_dies_fails_with_its_log_tail(tmp_path: Path) -> None:
    svc = Crashing(settings(tmp_path, s3=free_port()))
    with pytest.raises(ServiceError, match=r"(?s)s3 exited during start-up.*frobnicate=7"):
        await svc.start()
    assert svc.pid() is None


async def test_start_is_idempotent_and_stop_is_clean(tmp_path: Path) -> None:
    svc = MotoS3Service(settings(tmp_path, s3=free_port()))
    assert await svc.start() == "started"
    pid = svc.pid()
    assert pid is not None and svc.pid_file.exists()
    assert await svc.start() == "already running"
    assert svc.pid() == pid
    assert (await svc.health()).state == "healthy"
    assert svc.stop() is True
    assert not process.pid_alive(pid)
    assert not svc.pid_file.exists()
    assert (await svc.health()).state == "stopped"
    assert svc.stop() is False


async def test_a_port_taken_by_someone_else_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        svc = MotoS3Service(settings(tmp_path, s3=port))
        with pytest.raises(ServiceError, match=f"127.0.0.1:{port} is already in use.*"
                                               "REPLICATOR_DEV_S3_PORT"):
            await svc.start()


def test_status_json_reports_every_service_healthy(dev_stack: Stack) -> None:
    result = CliRunner().invoke(main, ["dev", "status", "--json"])
    assert result.exit_code == 0, result.output
    services = json.loads(result.output)["services"]
    assert [s["name"] for s in services] == list(SERVICE_NAMES)
    assert {s["state"] for s in services} == {"healthy"}
    assert all(s["address"] for s in services)


def test_status_exits_non_zero_when_a_service_is_down(tmp_path: Path) -> None:
    runner = CliRunner(env={"REPLICATOR_DEV_S3_PORT": str(free_port())})
    result = runner.invoke(main, ["dev", "--state-dir", str(tmp_path), "status", "--json",
                                  "--only", "s3"])
    assert result.exit_code == 1
    assert json.loads(result.output)["services"][0]["state"] == "stopped"


def test_external_services_are_probed_never_stopped(dev_stack: Stack, tmp_path: Path) -> None:
    env = {EXTERNAL_VARS[n]: s.address() for n, s in dev_stack.services.items()}
    runner = CliRunner(env=env)
    state = ["dev", "--state-dir", str(tmp_path)]
    up = runner.invoke(main, [*state, "up"])
    assert up.exit_code == 0, up.output
    assert up.output.count("external") == len(SERVICE_NAMES)
    assert runner.invoke(main, [*state, "down"]).exit_code == 0
    status = runner.invoke(main, [*state, "status", "--json"])
    assert status.exit_code == 0, status.output
    assert {s["mode"] for s in json.loads(status.output)["services"]} == {"external"}


def test_env_prints_exports_that_point_at_the_stack(dev_stack: Stack) -> None:
    result = CliRunner().invoke(main, ["dev", "env"])
    assert result.exit_code == 0
    pairs = (line.removeprefix("export ").split("=", 1) for line in result.output.splitlines())
    lines = {key: value for key, value in pairs}
    assert set(lines) == set(EXTERNAL_VARS.values())
    assert lines["REPLICATOR_DEV_KAFKA"] == dev_stack.services["kafka"].address()


# --- Toxiproxy ------------------------------------------------------------------------------


async def test_toxiproxy_forwards_to_postgres_and_an_outage_cuts_it(dev_stack: Stack) -> None:
    """The stack's Toxiproxy is healthy; a proxy created through its API reaches the real
    server, and disabling it breaks the open connection and refuses new ones until it is
    enabled again."""
    service = dev_stack.services["toxiproxy"]
    assert (await service.health()).state == "healthy"
    with toxiproxy(dev_stack) as proxies:
        proxy, dsn = postgres_through(proxies, dev_stack.services["pg15"].address())
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT inet_server_port()")
            upstream = int(str(conninfo_to_dict(dev_stack.services["pg15"].address())["port"]))
            assert await cur.fetchone() == (upstream,)
            await asyncio.to_thread(proxy.disable)
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(dsn, connect_timeout=3)
        await asyncio.to_thread(proxy.enable)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        name = proxy.name
        assert name in proxies.call("GET", "/proxies")
    assert name not in proxies.call("GET", "/proxies")  # deleted with the client


def test_toxiproxy_install_without_go_says_what_is_missing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    service = ToxiproxyService(settings(tmp_path))
    with pytest.raises(ServiceError, match="toxiproxy: the Go toolchain is needed"):
        service.install()
    assert not service.binary.exists()


async def test_toxiproxy_runs_as_a_managed_service(dev_stack: Stack, tmp_path: Path) -> None:
    """A second Toxiproxy from the stack's cached binary, on a port of its own: started,
    adopted, healthy, then stopped with nothing left running."""
    base = settings(tmp_path, toxiproxy=free_port())
    svc = ToxiproxyService(StackSettings(base.state_dir, dev_stack.settings.cache_dir,
                                         base.ports, {}))
    assert await svc.start() == "started"
    pid = svc.pid()
    assert pid is not None
    assert await svc.start() == "already running"
    assert (await svc.health()).state == "healthy"
    assert svc.stop() is True
    assert not process.pid_alive(pid)
    assert (await svc.health()).state == "stopped"
