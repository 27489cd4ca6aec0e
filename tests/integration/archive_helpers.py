"""Shared pieces of the archive tests: destinations on every store kind, a keyring, reading
an archive back into per-key states."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from connectors.registry import open_store
from replicator.config import Config, DestinationConfig, FlushConfig
from replicator.crypto import Keyring
from replicator.devstack.settings import S3_ACCESS_KEY, S3_SECRET_KEY
from replicator.transport.avro import to_python
from tests.conftest import StoreTarget
from tests.integration import archive_readers as archive

KEK = base64.b64encode(b"k" * 32).decode()
FAST = FlushConfig(critical_s=0.5, high_s=0.8, normal_s=1.0, low_s=1.5)


def sink_environ(**extra: str) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "REPLICATOR_KEK_TEST1": KEK,
            "REPLICATOR_KEK_ACTIVE": "TEST1", **extra}


def keyring() -> Keyring:
    return Keyring.from_env(sink_environ())


def destinations(tmp_path: Path, *targets: StoreTarget) -> tuple[DestinationConfig, ...]:
    local = tmp_path / "archive"
    local.mkdir(exist_ok=True)
    out = [DestinationConfig(name="local", url=f"file://{local}", flush=FAST)]
    out += [DestinationConfig(name=t.kind, url=t.url, flush=FAST) for t in targets]
    return tuple(out)


def with_destinations(config: Config, dests: tuple[DestinationConfig, ...]) -> Config:
    return config.model_copy(update={"destinations": dests})


async def archived_state(url: str, table: str) -> dict[Any, dict[str, Any] | None]:
    """key id -> row (None when deleted): the newest version by position of each key."""
    store = open_store(url, sink_environ())
    newest: dict[Any, tuple[tuple[int, int], dict[str, Any] | None]] = {}
    try:
        async for record in archive.change_records(store, keyring(), table):
            source = record["source"]
            position = (source["lsn"], source["seq"])
            key = to_python(record["key"])["id"]
            row = to_python(record["after"]) if record["after"] is not None else None
            if key not in newest or newest[key][0] < position:
                newest[key] = (position, row)
    finally:
        await store.close()
    return {k: v[1] for k, v in newest.items()}


async def archived_schemas(url: str, table: str) -> list[dict[str, Any]]:
    store = open_store(url, sink_environ())
    try:
        return await archive.schemas(store, keyring(), table)
    finally:
        await store.close()


async def destination_checkpoint(url: str, name: str,
                                 environ: dict[str, str] | None = None) -> int:
    """The destination's newest checkpoint, read with the keys of *environ* (default: the
    tests' sink environment)."""
    environ = environ or sink_environ()
    store = open_store(url, environ)
    try:
        return int(await archive.checkpoint(store, name, keyring=Keyring.from_env(environ)))
    finally:
        await store.close()
