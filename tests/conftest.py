"""Fixtures for tests against the real services of the local stack.

The session fixture `dev_stack` brings the stack up (or adopts a running one, or uses the
external services named by `REPLICATOR_DEV_*` variables) and stops at the end only what it
started itself. A service that cannot start fails every test that needs it: nothing is skipped.

Each test gets its own database, topic prefix and bucket/container, removed afterwards, so
tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replicator.devstack.settings import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, StackSettings
from replicator.devstack.stack import Stack

# Hypothesis's per-example deadline is a timing assertion: on a busy two-core machine an
# example can take longer than 200 ms without anything being wrong. Speed is measured in
# benchmarks/, not here.
settings.register_profile("replicator", deadline=None)
settings.load_profile("replicator")

PG_VERSIONS = ("15", "18")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def dev_stack() -> Iterator[Stack]:
    # Anchored to the checkout, not the working directory: pytest run from anywhere must find
    # (and adopt) the same stack, never start a second one on the same ports.
    default_dir = Path(__file__).resolve().parents[1] / ".replicator-dev"
    stack = Stack(StackSettings.from_env(os.environ, None if os.environ.get(
        "REPLICATOR_DEV_DIR") else default_dir))
    already = {n for n, s in stack.services.items() if not s.managed or s.pid() is not None}
    started = [n for n in stack.services if n not in already]
    try:
        asyncio.run(stack.up())
        yield stack
    finally:
        stack.down(started)


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="session", params=PG_VERSIONS, ids=[f"pg{v}" for v in PG_VERSIONS])
def pg_server_dsn(request: pytest.FixtureRequest, dev_stack: Stack) -> str:
    """The server-level DSN (database `postgres`) of each PostgreSQL version."""
    return dev_stack.services[f"pg{request.param}"].address()


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A fresh, empty database on each PostgreSQL version; dropped with its slots afterwards."""
    name = unique("t_")
    with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(pg_server_dsn, dbname=name)
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
            # A slot stays active until its walsender has exited, which pg_terminate_backend
            # only asks for: drop the inactive ones, and wait for the others.
            deadline = time.monotonic() + 30
            while True:
                admin.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NOT NULL", (name,))
                admin.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NULL", (name,))
                row = admin.execute("SELECT count(*) FROM pg_replication_slots "
                                    "WHERE database = %s", (name,)).fetchone()
                if not row or not row[0] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


# --- Kafka --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(dev_stack: Stack) -> str:
    return dev_stack.services["kafka"].address()


@pytest.fixture
async def topic_prefix(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A topic-name prefix of this test's own; its topics are deleted afterwards."""
    from aiokafka.admin import AIOKafkaAdminClient

    prefix = unique("t")
    yield prefix
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


# --- object stores ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreTarget:
    """A bucket or container of this test's own on one object-store emulator."""

    kind: str  # "s3" | "azure" | "gcs"
    endpoint: str
    bucket: str

    @property
    def url(self) -> str:
        """The store URL in the form the connectors take."""
        scheme = {"s3": "s3", "azure": "az", "gcs": "gs"}[self.kind]
        query = f"?endpoint={self.endpoint}" + (f"&region={S3_REGION}" if self.kind == "s3" else "")
        return f"{scheme}://{self.bucket}/{query}"


def s3_client(endpoint: str):  # type: ignore[no-untyped-def]
    from aiobotocore.session import get_session

    return get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
    )


@pytest.fixture
async def s3_target(dev_stack: Stack) -> AsyncIterator[StoreTarget]:
    target = StoreTarget("s3", dev_stack.services["s3"].address(), unique("t-"))
    async with s3_client(target.endpoint) as client:
        await client.create_bucket(Bucket=target.bucket)
        yield target
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=target.bucket):
            for obj in page.get("Contents", []):
                await client.delete_object(Bucket=target.bucket, Key=obj["Key"])
        await client.delete_bucket(Bucket=target.bucket)


@pytest.fixture
async def azure_target(dev_stack: Stack) -> AsyncIterator[StoreTarget]:
    from azure.storage.blob.aio import BlobServiceClient

    from replicator.devstack.objectstores import azurite_connection_string

    target = StoreTarget("azure", dev_stack.services["azure"].address(), unique("t-"))
    conn = azurite_connection_string(target.endpoint)
    async with BlobServiceClient.from_connection_string(conn) as client:
        await client.create_container(target.bucket)
        yield target
        await client.delete_container(target.bucket)


@pytest.fixture
async def gcs_target(dev_stack: Stack) -> AsyncIterator[StoreTarget]:
    from replicator.devstack.objectstores import gcs_client

    target = StoreTarget("gcs", dev_stack.services["gcs"].address(), unique("t-"))
    client = gcs_client(target.endpoint)
    bucket = await asyncio.to_thread(client.create_bucket, target.bucket)
    yield target

    def drop() -> None:
        for blob in client.list_blobs(target.bucket):
            blob.delete()
        bucket.delete()

    await asyncio.to_thread(drop)


@pytest.fixture(params=["s3", "azure", "gcs"])
def store_target(request: pytest.FixtureRequest) -> StoreTarget:
    """Each object-store emulator in turn, with a fresh bucket/container."""
    target: StoreTarget = request.getfixturevalue(f"{request.param}_target")
    return target
