"""All destinations of a configuration, each its own `SinkWorker`, run side by side.

A destination that fails (store down, credentials refused mid-run) only trips its own
breaker; the others go on. A destination that cannot even be opened at start-up (an unknown
scheme, missing credentials) is a configuration problem: `SinkSetupError` names it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from connectors.base import ObjectStore
from connectors.errors import Fatal, StoreError
from connectors.registry import open_store
from connectors.retry import RetryingStore
from replicator.archive.layout import checkpoints_prefix
from replicator.config import Config
from replicator.crypto import CryptoError, Keyring
from replicator.errors import OperatorError
from replicator.priority import wedding_day
from replicator.sink.compaction import CompactionStats, Compactor
from replicator.sink.shared import SharedDecodes
from replicator.sink.stats import SinkStats
from replicator.sink.worker import SinkWorker

log = logging.getLogger(__name__)


class SinkSetupError(OperatorError):
    """A destination cannot be set up; the message names it and what to fix."""


def load_keyring(config: Config, environ: Mapping[str, str]) -> Keyring:
    try:
        if config.encryption.keyring_file is not None:
            return Keyring.from_file(config.encryption.keyring_file)
        return Keyring.from_env(environ)
    except (CryptoError, OSError, ValueError) as exc:
        raise SinkSetupError(f"encryption keys: {exc}") from exc


def _rows_written(stats: SinkStats) -> Callable[[], int]:
    return lambda: stats.changes_written


async def wedding_day_finding(config: Config) -> str | None:
    """The wedding-day guard's finding from the source database's calendar (retention
    does not run on a wedding day); `psycopg.Error` when it cannot be read."""
    if not config.priority.weddings_table:
        return None
    import psycopg
    from psycopg.conninfo import make_conninfo

    src = config.source
    password = src.password.get_secret_value() if src.password else None
    dsn = make_conninfo(src.dsn, password=password) if password else src.dsn
    async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10) as conn:
        return await wedding_day(conn, config.priority)


class Sinks:
    def __init__(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.workers: dict[str, SinkWorker] = {}
        self.compactors: dict[str, Compactor] = {}
        self._stores: list[ObjectStore] = []

    @property
    def stats(self) -> dict[str, SinkStats]:
        return {name: worker.stats for name, worker in self.workers.items()}

    @property
    def compaction_stats(self) -> dict[str, CompactionStats]:
        return {name: compactor.stats for name, compactor in self.compactors.items()}

    async def open(self) -> None:
        keyring = load_keyring(self.config, self.environ)
        # The destinations' sinks read the same records: one decodes, the others take it.
        shared: SharedDecodes[Any] = SharedDecodes(len(self.config.destinations))
        for destination in self.config.destinations:
            try:
                bare = open_store(destination.url, self.environ)
            except (StoreError, ValueError) as exc:
                await self.close()
                raise SinkSetupError(f"destination {destination.name!r}: {exc}") from exc
            # Retries of retriable errors here; a failure that outlasts them trips the
            # destination's breaker in its worker.
            store: ObjectStore = RetryingStore(bare)
            self._stores.append(store)
            await self._preflight(destination.name, bare)
            worker = SinkWorker(destination, self.config.kafka, store, keyring,
                                claims_url=self.config.claims_url, shared=shared,
                                conflicts=self.config.policies)
            self.workers[destination.name] = worker
            if worker.spool is not None:
                try:
                    worker.spool.open()
                except OSError as exc:
                    await self.close()
                    raise SinkSetupError(f"destination {destination.name!r}: its spool folder "
                                         f"{worker.spool.root} cannot be used ({exc})") from exc
            if destination.compaction.enabled:
                self.compactors[destination.name] = Compactor(
                    destination, self.environ, self.config.encryption.keyring_file,
                    written=_rows_written(worker.stats),
                    leader=partial(getattr, worker, "checkpointer"),
                    wedding_day=partial(wedding_day_finding, self.config),
                    conflicts=self.config.conflicts)

    async def _preflight(self, name: str, store: ObjectStore) -> None:
        """One LIST of the destination's checkpoints, to catch what only an operator can fix
        (no credentials, access denied, a missing bucket or directory) at start-up, where it
        is a `SinkSetupError`. A store that is merely unreachable now is left to the worker's
        retries and breaker: it must not keep the other destinations from starting."""
        listing = store.list(checkpoints_prefix(name))
        try:
            await anext(listing, None)
        except Fatal as exc:
            await self.close()
            raise SinkSetupError(f"destination {name!r}: {exc}") from exc
        except StoreError as exc:
            log.warning("destination %s is not reachable at start-up (%s); its sink retries",
                        name, exc)
        finally:
            aclose = getattr(listing, "aclose", None)
            if aclose is not None:
                await aclose()

    async def close(self) -> None:
        stores, self._stores = self._stores, []
        for store in stores:
            await store.close()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for compactor in self.compactors.values():
            compactor.stop()

    async def run(self) -> None:
        if not self.workers:
            await self.open()
        try:
            async with asyncio.TaskGroup() as group:
                for name, worker in self.workers.items():
                    group.create_task(worker.run(), name=f"sink:{name}")
                for name, compactor in self.compactors.items():
                    group.create_task(compactor.run(), name=f"compaction:{name}")
        finally:
            await self.close()
