"""Bad input, through the real command line and against the real services: each mistake is
one line naming what and where, exit code 2, no traceback. And the small hardening around
it: `replicator demo` refuses anything but the local stack, the metrics endpoint caps what a
client may hold, the compaction child gets only the environment it needs."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from replicator.cli import main
from replicator.config import DestinationConfig, load_config
from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import Stack
from replicator.ops import metrics as ops_metrics
from replicator.ops.metrics import MetricsServer, PipelineCollector
from replicator.sink.compaction import Compactor
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import KEK

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-source-password"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`replicator ARGS` as a user runs it: a process of its own."""
    environ = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "replicator", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


def one_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single `error:` line of a command that stopped with exit 2, with no traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert SECRET not in done.stderr + done.stdout
    return errors[0]


def toml(tmp_path: Path, text: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SOURCE = '[source]\ndsn = "host=127.0.0.1 port=15432 dbname=wedsync"\n'


# --- the configuration --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "needles"), [
    (SOURCE + '[metrics]\nlisten = "localhost"\n', ("metrics.listen", "port")),
    (SOURCE + '[metrics]\nlisten = "::1:9187"\n', ("metrics.listen", "[::1]")),
    (SOURCE + '[priority]\ntimezone = "Mars/Olympus_Mons"\n',
     ("priority.timezone", "Mars/Olympus_Mons")),
    ('[source]\ndsn = "not a dsn"\n', ("source.dsn", "connection string")),
])
def test_a_bad_setting_is_one_line_naming_the_file_and_key(tmp_path: Path, text: str,
                                                           needles: tuple[str, ...]) -> None:
    path = toml(tmp_path, text)
    for command in (["run", "--only", "capture"], ["snapshot", "--table", "public.guests"]):
        one_line(cli(*command, "--config", str(path),
                     env={"REPLICATOR_SOURCE_PASSWORD": SECRET}), str(path), *needles)


def test_a_dsn_that_does_not_parse_does_not_echo_its_password(tmp_path: Path) -> None:
    path = toml(tmp_path, f'[source]\ndsn = "host=db password={SECRET} oops"\n')
    one_line(cli("run", "--config", str(path)), "source.dsn")


def test_the_config_must_be_a_utf8_file(tmp_path: Path) -> None:
    one_line(cli("run", "--config", str(tmp_path)), str(tmp_path), "directory")
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b'[source]\ndsn = "host=caf\xe9"\n')
    one_line(cli("snapshot", "--config", str(binary), "--table", "t"), str(binary), "UTF-8")


def test_metrics_listen_on_ipv6_loopback(tmp_path: Path) -> None:
    config = load_config(toml(tmp_path, SOURCE + '[metrics]\nlisten = "[::1]:0"\n'), environ={})

    async def scrape() -> bytes:
        server = MetricsServer(config.metrics.listen, PipelineCollector(lambda: None, dict))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("::1", server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer
        finally:
            await server.stop()

    answer = asyncio.run(scrape())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")


# --- stores -------------------------------------------------------------------------------


def no_aws(tmp_path: Path) -> dict[str, str]:
    """An environment with no AWS credentials anywhere botocore looks (but the keyring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true",
            "REPLICATOR_KEK_TEST1": KEK, "REPLICATOR_KEK_ACTIVE": "TEST1"}


def run_clean(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replicator", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


async def test_s3_without_credentials_names_the_missing_variables(
        tmp_path: Path, s3_target: StoreTarget) -> None:
    env = no_aws(tmp_path)
    path = toml(tmp_path, SOURCE + '[metrics]\nlisten = "127.0.0.1:0"\n[[destinations]]\n'
                f'name = "s3"\nurl = "{s3_target.url}"\n')
    for done in (run_clean(env, "run", "--only", "sinks", "--config", str(path)),
                 run_clean(env, "replay", "--from", s3_target.url, "--at", "latest",
                           "--dry-run")):
        one_line(done, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "not set",
                 s3_target.bucket)


@pytest.mark.parametrize(("url", "needles"), [
    ("s3://b/x?endpoint=http://[::1", ("--from", "s3://b/x", "malformed")),
    ("s3://b/x?endpoint=http://127.0.0.1:port", ("--from", "endpoint", "port")),
    ("s3://b/x?endpoint=http://127.0.0.1:99999", ("--from", "endpoint", "port")),
    ("file://relative/dir", ("--from", "file://relative/dir")),
    ("https://example.com/archive", ("--from", "scheme")),
])
def test_a_store_url_that_does_not_parse(url: str, needles: tuple[str, ...]) -> None:
    env = {"REPLICATOR_KEK_TEST1": KEK, "REPLICATOR_KEK_ACTIVE": "TEST1"}
    one_line(cli("replay", "--at", "latest", "--dry-run", "--from", url, env=env), *needles)


@pytest.mark.parametrize("command", ["compact", "verify"])
def test_every_command_that_reads_a_store_says_so(command: str) -> None:
    env = {"REPLICATOR_KEK_TEST1": KEK, "REPLICATOR_KEK_ACTIVE": "TEST1"}
    one_line(cli(command, "--from", "s3://b/x?endpoint=http://[::1", env=env),
             "--from", "s3://b/x", "malformed")


# --- replicator demo ----------------------------------------------------------------------


def demo_config(tmp_path: Path, dsn: str, kafka: str) -> Path:
    return toml(tmp_path, f'[source]\ndsn = "{dsn}"\n[kafka]\nbootstrap_servers = "{kafka}"\n',
                "demo.toml")


@pytest.mark.parametrize(("dsn", "kafka", "needles"), [
    # A real server elsewhere: never rewritten, and never even connected to.
    ("postgresql://postgres@192.0.2.10:{pg}/wedsync", "{kafka}", ("source.dsn", "192.0.2.10")),
    # Loopback, but not a port of the local stack: some other server on this machine.
    ("host=127.0.0.1 port=5432 dbname=wedsync", "{kafka}", ("source.dsn", "5432")),
    ("host=localhost hostaddr=192.0.2.10 port={pg} dbname=wedsync", "{kafka}",
     ("source.dsn", "192.0.2.10")),
    ("host=/var/run/postgresql port={pg} dbname=wedsync", "{kafka}",
     ("source.dsn", "/var/run/postgresql")),
    ("postgresql://postgres@127.0.0.1:{pg}/wedsync", "kafka.internal:9092",
     ("kafka.bootstrap_servers", "kafka.internal")),
])
def test_demo_refuses_anything_but_the_local_stack(
        dev_stack: Stack, tmp_path: Path, dsn: str, kafka: str, needles: tuple[str, ...]) -> None:
    settings = StackSettings.from_env(os.environ)
    kafka_address = dev_stack.services["kafka"].address()
    path = demo_config(tmp_path, dsn.format(pg=settings.ports["pg15"]),
                       kafka.format(kafka=kafka_address))
    state = tmp_path / "state"
    result = CliRunner().invoke(main, ["demo", "--config", str(path), "--seconds", "1"],
                                env={"REPLICATOR_DEV_DIR": str(state)})
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "demo" in errors[0], result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not state.exists()  # nothing was written, not even the demo's key


# --- the metrics endpoint -----------------------------------------------------------------


@pytest.fixture
def metrics() -> Iterator[tuple[asyncio.AbstractEventLoop, MetricsServer]]:
    """A real metrics server on a port of its own, on a loop in a thread of its own, so the
    test's blocking sockets are clients like any other."""
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = MetricsServer("127.0.0.1:0", PipelineCollector(lambda: None, dict))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    yield loop, server
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=60)


def get(server: MetricsServer, path: str = "/healthz", headers: bytes = b"") -> bytes:
    with connect(server) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + headers + b"\r\n")
        return read_all(client)


def read_all(client: socket.socket) -> bytes:
    out = b""
    while chunk := client.recv(65536):
        out += chunk
    return out


def closed_by_server(client: socket.socket, sends: int) -> bool:
    """Sends one byte a second (header lines that never end the request) until the server
    closes the connection, or *sends* bytes went out."""
    client.settimeout(1.0)
    for _ in range(sends):
        try:
            client.sendall(b"a" if _ % 2 == 0 else b"\n")
            if client.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
        time.sleep(0)
    return False


def test_a_slow_client_cannot_hold_the_metrics_endpoint(metrics: tuple[object, MetricsServer]
                                                        ) -> None:
    _, server = metrics
    with connect(server) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert get(server).startswith(b"HTTP/1.1 200")  # while the slow one holds a connection
        # One byte a second, a header line every two: the server's deadline for the whole
        # request ends it, not a per-line timeout it could renew forever.
        assert closed_by_server(slow, sends=30)
    assert get(server).startswith(b"HTTP/1.1 200")


def test_the_metrics_endpoint_caps_request_size(metrics: tuple[object, MetricsServer]) -> None:
    _, server = metrics
    big = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 1000) for n in range(16))
    assert get(server, headers=big).startswith(b"HTTP/1.1 431")
    with connect(server) as client:  # one endless line
        client.sendall(b"GET /" + b"a" * 20_000)
        assert read_all(client).startswith(b"HTTP/1.1 431")
    assert get(server).startswith(b"HTTP/1.1 200")


def test_the_metrics_endpoint_caps_connections(metrics: tuple[object, MetricsServer]) -> None:
    _, server = metrics
    idle = [connect(server) for _ in range(ops_metrics.MAX_CONNECTIONS)]
    try:
        # One more is answered at once, and closed: it does not wait for a slot.
        with connect(server) as extra:
            assert read_all(extra).startswith(b"HTTP/1.1 503")
    finally:
        for client in idle:
            client.close()
    # The slots come free as the server sees the idle clients leave.
    for _ in range(1000):
        if get(server).startswith(b"HTTP/1.1 200"):
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the endpoint stayed busy after its clients left")


# --- the compaction child -----------------------------------------------------------------


async def test_the_compaction_child_gets_no_source_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_target: StoreTarget) -> None:
    """The real child (`replicator compact` on the destination's store), started through a
    shim that records the environment it was given before it runs Python."""
    dump = tmp_path / "child.env"
    shim = tmp_path / "python"
    shim.write_text(f"#!/bin/sh\nenv -0 > {dump}\nexec {sys.executable} \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(shim))
    password_file = tmp_path / "password"
    password_file.write_text(SECRET)
    environ = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "REPLICATOR_KEK_TEST1": KEK, "REPLICATOR_KEK_ACTIVE": "TEST1",
               "REPLICATOR_SOURCE_PASSWORD": SECRET,
               "REPLICATOR_SOURCE_PASSWORD_FILE": str(password_file),
               "PGPASSWORD": SECRET, "DATABASE_URL": f"postgresql://u:{SECRET}@db/x",
               "AZURE_STORAGE_KEY": SECRET, "GITHUB_TOKEN": SECRET}
    destination = DestinationConfig(name="s3", url=s3_target.url)
    compactor = Compactor(destination, environ)
    # An empty bucket: nothing to compact yet, which the schedule takes as a success. The
    # child reached the store with the credentials it was given.
    assert await compactor.run_once()
    assert compactor.stats.failures == 0
    child = dict(entry.split("=", 1) for entry in dump.read_text().split("\0") if entry)
    assert SECRET not in "\0".join(f"{k}={v}" for k, v in child.items())
    assert not {"REPLICATOR_SOURCE_PASSWORD", "REPLICATOR_SOURCE_PASSWORD_FILE", "PGPASSWORD",
                "DATABASE_URL", "AZURE_STORAGE_KEY", "GITHUB_TOKEN"} & child.keys()
    assert child["REPLICATOR_KEK_TEST1"] == KEK and child["REPLICATOR_KEK_ACTIVE"] == "TEST1"
    assert child["AWS_ACCESS_KEY_ID"] == "testing" and child["PATH"] == os.environ["PATH"]


def test_demo_accepts_the_local_stack(dev_stack: Stack, tmp_path: Path) -> None:
    from replicator.cli.demo import check_local_stack

    settings = StackSettings.from_env(os.environ)
    kafka = dev_stack.services["kafka"].address()
    pg15, pg18 = settings.ports["pg15"], settings.ports["pg18"]
    for dsn in (dev_stack.services["pg15"].address(), dev_stack.services["pg18"].address(),
                f"host=localhost port={pg15} dbname=wedsync",
                f"postgresql://postgres@[::1]:{pg18}/wedsync"):
        config = load_config(demo_config(tmp_path, dsn, kafka), environ={})
        check_local_stack(config, settings, {})
    # The PG* variables count where the DSN is silent, as for libpq.
    config = load_config(demo_config(tmp_path, "dbname=wedsync", kafka), environ={})
    check_local_stack(config, settings, {"PGHOST": "127.0.0.1", "PGPORT": str(pg15)})
    # The stack's own services may be external ones (`REPLICATOR_DEV_PG15_DSN`, ...).
    external = StackSettings.from_env({
        "REPLICATOR_DEV_PG15_DSN": "postgresql://postgres@db.dev:6543/postgres",
        "REPLICATOR_DEV_KAFKA": "kafka.dev:9092"})
    config = load_config(demo_config(tmp_path, "postgresql://postgres@db.dev:6543/wedsync",
                                     "kafka.dev:9092"), environ={})
    check_local_stack(config, external, {})
