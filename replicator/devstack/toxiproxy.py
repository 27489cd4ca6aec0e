"""Toxiproxy: a TCP proxy whose faults are set through an HTTP API, for the fault tests.

A test puts a proxy in front of a real service (`POST /proxies`), points its client at the
proxy, and then adds latency, resets, timeouts or an outage (`POST /proxies/<name>` with
`{"enabled": false}`) while the pipeline runs. The server starts with no proxies: each test
creates its own (a unique name, a free port) and deletes it afterwards, so tests sharing the
server never touch each other's.

Toxiproxy 2.5.0 is built from source with the machine's Go toolchain (`go install
github.com/Shopify/toxiproxy/v2/cmd/server@v2.5.0`, through the module proxy `go env GOPROXY`
names; Go's own build and module caches are used) and the binary kept as
`<cache>/toxiproxy-<version>/toxiproxy-server`. Its API listens on 127.0.0.1 only: whoever
reaches it can open a proxy to anywhere. The probe lists the proxies (`GET /proxies`), the
call the tests start with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from replicator.devstack.base import Launch, Service, ServiceError

TOXIPROXY_VERSION = "2.5.0"
MODULE = "github.com/Shopify/toxiproxy/v2"


class ToxiproxyService(Service):
    name = "toxiproxy"
    start_timeout = 20.0

    def address(self) -> str:
        return (self.external or f"http://127.0.0.1:{self.port}").rstrip("/")

    async def probe(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
        async with (aiohttp.ClientSession(timeout=timeout) as session,
                    session.get(f"{self.address()}/proxies") as response):
            if response.status != 200:
                raise ServiceError(f"toxiproxy at {self.address()}: GET /proxies answered "
                                   f"HTTP {response.status}")
            body = await response.json(content_type=None)
        if not isinstance(body, dict):
            raise ServiceError(f"toxiproxy at {self.address()}: GET /proxies answered "
                               f"{str(body)[:80]!r}, not the proxies by name")

    @property
    def binary(self) -> Path:
        return self.settings.cache_dir / f"toxiproxy-{TOXIPROXY_VERSION}" / "toxiproxy-server"

    def install(self) -> None:
        if self.binary.exists():
            return
        go = shutil.which("go")
        if go is None:
            raise ServiceError("toxiproxy: the Go toolchain is needed to build Toxiproxy "
                               "(https://go.dev/dl/, or apt-get install golang-go)")
        build = self.binary.parent / "build"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        target = f"{MODULE}/cmd/server@v{TOXIPROXY_VERSION}"
        result = subprocess.run(
            [go, "install", f"-ldflags=-X {MODULE}.Version={TOXIPROXY_VERSION}", target],
            env={**os.environ, "GOBIN": str(build), "CGO_ENABLED": "0"},
            capture_output=True, text=True, check=False,
        )
        built = build / "server"
        if result.returncode != 0 or not built.exists():
            raise ServiceError(f"toxiproxy: go install {target} failed:\n"
                               f"{(result.stdout + result.stderr)[-3000:]}")
        os.replace(built, self.binary)  # atomic: a binary in place is a finished install
        shutil.rmtree(build, ignore_errors=True)

    def launch(self) -> Launch:
        # Its default level (trace) logs every byte copied; info keeps proxies and clients.
        return Launch(argv=[str(self.binary), "-host", "127.0.0.1", "-port", str(self.port)],
                      env={**os.environ, "LOG_LEVEL": "info"})
