"""A destination's local spool, for an outage of its store longer than Kafka keeps records.

Once the store has failed for `spool.after_s` (the breaker open, every flush failing), the
sink flushes into the spool instead: each flush is a *batch*, a folder
`<spool.dir>/<destination>/<n, 20 digits>/` holding the objects the flush would have
written to the store (`objects/<object name>`, each already encrypted under its name, as
the store would hold it) and a `manifest.json` (encrypted too) naming them in the order
written, with the (tier, commit LSN, seq) of every change they hold. A batch is written as
`<n>.partial/` and renamed once its manifest is in, every file and folder synced first, so
a batch either is whole or does not exist: after a crash, a `.partial` folder is deleted at
start, and its records, whose offsets were never committed, are read again from Kafka.

Once a batch is sealed, the sink commits the Kafka offsets of its records, whatever the
checkpoint: Kafka may now expire them. The checkpoint does not pass them: they are not in
the store. When the store answers again, before anything new is written there, the batches
are shipped oldest first, each object create-only in the order written (an object that
exists already, from a trial write before the outage was declared, is the same bytes), and
only once a batch is all in the store are its changes and transaction records counted
towards the checkpoint. The batch is deleted once the checkpoint has passed it (a member
that is not the checkpointer: once its progress object carries it), since until then it is
all that says those records are in the store. The same happens at start for a spool a
stopped process left: every batch still there is shipped (again) and counted.

A write that fails (the disk is full: `SpoolFull`, naming the folder) deletes the batch
being written, so no partial object is ever left; the sink then drops what it had read and
not written and reads it again from the committed offsets. The spool stops there until space
is freed or the store returns; the records wait in Kafka meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from connectors.base import ObjectStore
from connectors.errors import AlreadyExists, StoreError
from replicator.archive.layout import TRANSACTIONS
from replicator.archive.segment import decode_transaction_segment
from replicator.crypto import CryptoError, Keyring, decrypt, encrypt
from replicator.events import Tier, TransactionRecord
from replicator.position import Lsn
from replicator.sink.members import decode_progress, encode_progress
from replicator.sink.stats import SinkStats

log = logging.getLogger(__name__)

__all__ = ["Shipped", "Spool", "SpoolBatch", "SpoolFull"]

_PARTIAL = ".partial"
_MANIFEST = "manifest.json"


class SpoolFull(StoreError):
    """A spool write failed for lack of space (or any other local error), naming the
    folder; the batch being written is deleted."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _object_path(root: Path, key: str) -> Path:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object name {key!r} cannot be spooled")
    return root.joinpath("objects", *parts)


class SpoolBatch:
    """One flush written into the spool."""

    def __init__(self, spool: Spool, number: int) -> None:
        self.spool = spool
        self.number = number
        self.folder = spool.root / f"{number:020d}{_PARTIAL}"
        self.keys: list[str] = []
        self.bytes = 0

    def _failed(self, what: str, exc: OSError) -> SpoolFull:
        self.discard()
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
        return SpoolFull(f"destination {self.spool.destination}: cannot spool {what} into "
                         f"{self.spool.root} ({reason}); the batch is dropped, nothing partial "
                         "is left, and its records are read again from Kafka once space is "
                         "freed or the store answers", url=f"file://{self.spool.root}")

    async def put(self, key: str, sealed: bytes) -> None:
        """One object, already encrypted under *key*."""
        path = _object_path(self.folder, key)
        try:
            await asyncio.to_thread(_write_file, path, sealed)
        except OSError as exc:
            raise self._failed(key, exc) from None
        if key not in self.keys:
            self.keys.append(key)
            self.bytes += len(sealed)

    async def seal(self, changes: Iterable[tuple[Tier, Lsn, int]], *, hold: bool) -> None:
        """Write the manifest and make the batch whole (renamed from `.partial`)."""
        doc = json.loads(encode_progress(self.spool.destination, "spool", changes, hold=hold))
        doc["objects"] = self.keys
        name = self.spool.manifest_name(self.number)
        data = encrypt(json.dumps(doc, sort_keys=True).encode(), name, self.spool.keyring)
        final = self.spool.root / f"{self.number:020d}"

        def seal() -> None:
            _write_file(self.folder / _MANIFEST, data)
            for folder, _, _ in os.walk(self.folder):
                _fsync_dir(Path(folder))
            os.rename(self.folder, final)
            _fsync_dir(self.spool.root)
        try:
            await asyncio.to_thread(seal)
        except OSError as exc:
            raise self._failed("its manifest", exc) from None
        self.folder = final
        self.spool.bytes += self.bytes + len(data)
        self.spool.waiting += 1

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Shipped:
    """What a batch held, now in the store."""

    def __init__(self, changes: list[tuple[Tier, Lsn, int]], records: list[TransactionRecord],
                 hold: bool) -> None:
        self.changes = changes
        self.records = records
        self.hold = hold


class Spool:
    """The spool folder of one destination."""

    def __init__(self, folder: Path, destination: str, keyring: Keyring,
                 stats: SinkStats | None = None) -> None:
        self.root = folder / destination
        self.destination = destination
        self.keyring = keyring
        self.stats = stats or SinkStats()  # `spool_bytes` follows `bytes`
        self._bytes = 0
        self.waiting = 0  # sealed batches not yet shipped
        self.shipped: dict[Path, Lsn] = {}  # in the store, kept until counted: highest LSN
        self.oldest_us = 0  # at start: when the oldest batch left by an earlier run was written
        self._next = 1
        self._opened = False

    @property
    def bytes(self) -> int:
        """What the spool holds (sealed batches, shipped or not)."""
        return self._bytes

    @bytes.setter
    def bytes(self, value: int) -> None:
        self._bytes = self.stats.spool_bytes = value

    def manifest_name(self, number: int) -> str:
        """The name a batch's manifest is encrypted under."""
        return f"spool/{self.destination}/{number:020d}/{_MANIFEST}"

    def open(self) -> None:
        """Create the folder; delete batches never sealed; count what is spooled."""
        if self._opened:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            if entry.name.endswith(_PARTIAL):
                log.warning("destination %s: deleting the spool batch %s, never sealed (its "
                            "records are read again from Kafka)", self.destination, entry)
                shutil.rmtree(entry, ignore_errors=True)
        batches = self.batches()
        self.bytes = sum(_size(b) for b in batches)
        self.waiting = len(batches)
        if batches:  # when the oldest was written: its changes committed before (for RPO)
            self.oldest_us = int(batches[0].stat().st_mtime * 1e6)
        self._next = (int(batches[-1].name) + 1) if batches else 1
        self._opened = True

    def batches(self) -> list[Path]:
        """The sealed batches, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name.isdigit() and p.is_dir() and p not in self.shipped)

    def begin(self) -> SpoolBatch:
        self.open()
        batch = SpoolBatch(self, self._next)
        self._next += 1
        return batch

    async def ship(self, batch: Path, store: ObjectStore, take: Any = None) -> Shipped:
        """Write *batch*'s objects into *store*, in order and create-only; then delete it.
        Store errors propagate (the batch stays, to ship again)."""
        name = self.manifest_name(int(batch.name))
        try:
            doc = json.loads(decrypt((batch / _MANIFEST).read_bytes(), name, self.keyring))
            changes, hold, _ = decode_progress(doc)
            keys = doc["objects"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError("objects is not a list of names")
        except (OSError, CryptoError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"destination {self.destination}: spool batch {batch} cannot be "
                             f"read ({exc}); move it away to go on (its records' Kafka "
                             "offsets were committed: without it, those changes are not "
                             "archived)", url=f"file://{self.root}") from None
        records: list[TransactionRecord] = []
        for key in keys:
            data = await asyncio.to_thread(_object_path(batch, key).read_bytes)
            if take is not None:
                await take(len(data))
            with contextlib.suppress(AlreadyExists):
                await store.put(key, data)
            if key.startswith(TRANSACTIONS):
                _, found = decode_transaction_segment(decrypt(data, key, self.keyring))
                records.extend(found)
        top = max([Lsn(0), *(c[1] for c in changes), *(r.commit_lsn for r in records)])
        self.shipped[batch] = Lsn(0) if hold else top
        self.waiting = max(0, self.waiting - 1)
        log.info("destination %s: spool batch %s shipped (%d objects)", self.destination,
                 batch.name, len(keys))
        return Shipped(changes, records, hold)

    async def release(self, checkpoint: Lsn | None = None) -> None:
        """Delete the shipped batches the checkpoint has passed (all of them without one:
        a member's progress object now carries what they held). Until then a batch stays,
        and is shipped and counted again after a restart: its records' offsets are
        committed, so it is all that says they are in the store."""
        for batch, top in list(self.shipped.items()):
            if checkpoint is None or (top and top < checkpoint):
                size = await asyncio.to_thread(_size, batch)
                await asyncio.to_thread(shutil.rmtree, batch, True)
                self.bytes = max(0, self.bytes - size)
                del self.shipped[batch]
