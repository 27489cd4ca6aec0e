"""Reading a destination's objects for a restore: fetched, decrypted, decoded and checked.

`Archive` fetches and decrypts objects and decodes segments and parts; every failure is a
`ReplayFailed` naming the object and the nearest earlier restorable point (a missing object, a
tampered or truncated one, an unknown or wrong key, content that does not match its header).
`Archive.read_timeline` reduces the archived transaction records to what a restore asks of
them (`archive.timeline.Timeline`).
"""


from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

from connectors.base import ObjectStore
from connectors.errors import NotFound, StoreError
from replicator.archive.layout import (
    DEAD_LETTERS,
    GAPS,
    TRANSACTIONS,
    checkpoints_prefix,
    destination_of,
    is_checkpoint_key,
    is_part_key,
    is_snapshot_key,
    parse_checkpoint_key,
    parse_gap_key,
    parse_part_key,
    parse_schema_key,
    parse_segment_key,
    parse_snapshot_key,
    schemas_prefix,
    without_digest,
)
from replicator.archive.part import PartCorrupt, PartHeader, decode_part
from replicator.archive.segment import (
    SegmentError,
    SegmentHeader,
    chunk_stream,
    decode_record_segment,
    decode_transaction_segment,
)
from replicator.archive.snapshot import SnapshotPart
from replicator.archive.timeline import Timeline, TimelineBuilder
from replicator.crypto import CryptoError, Keyring, UnknownKey, decrypt, decrypt_stream
from replicator.errors import OperatorError, ReplicatorError
from replicator.events import Tier, TransactionRecord
from replicator.position import INVALID_LSN, Lsn

__all__ = ["CHECKPOINTS_KEPT", "Archive", "ReplayFailed", "Timeline", "UntrustedObject",
           "checkpoint", "checkpoint_document", "checkpoint_names", "current_rss_mb",
           "dead_letters", "destinations", "nearest_hint", "recorded_gaps", "schema_versions"]


class ReplayFailed(ReplicatorError):
    """The replay stopped on an object it could not use. `object` names it; `nearest` is the
    nearest earlier restorable point, when there is one."""

    def __init__(self, message: str, *, object: str | None = None,
                 nearest: Lsn | None = None) -> None:
        super().__init__(message)
        self.object = object
        self.nearest = nearest


def current_rss_mb() -> float:
    """The process's resident memory now (Linux: /proc/self/statm; else the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nearest_hint(nearest: Lsn | None) -> str:
    if nearest is None:
        return "; no earlier point is restorable"
    return f"; the nearest restorable earlier point is {nearest} (--at {nearest})"


# --- reading objects -------------------------------------------------------------------------


class Archive:
    """One destination's objects, read and decrypted."""

    def __init__(self, store: ObjectStore, keyring: Keyring, timeline: Timeline | None = None
                 ) -> None:
        self.store = store
        self.keyring = keyring
        self.timeline = timeline or Timeline()
        self.bytes_read = 0
        self.objects_read = 0
        self.memory_budget_mb: float | None = None  # checked as changed keys accumulate
        # The largest resident memory seen at the checks (after every object and batch):
        # unlike ru_maxrss, not inflated by a parent's memory when started by fork/vfork.
        self.peak_rss_mb = 0.0

    def check_memory(self, table: str, changed_keys: int) -> None:
        """Note the resident memory (`peak_rss_mb`), and stop the replay when the process
        outgrows the memory budget (module docstring)."""
        used = current_rss_mb()
        self.peak_rss_mb = max(self.peak_rss_mb, used)
        if self.memory_budget_mb is None:
            return
        if used > self.memory_budget_mb:
            raise ReplayFailed(
                f"{table}: the replay uses {used:,.0f} MB holding {changed_keys:,} changed "
                f"keys, over its memory budget of {self.memory_budget_mb:,.0f} MB: restore "
                "fewer tables at once (--jobs 1), a point with fewer changes since the "
                "table's snapshot, or raise --memory-budget")

    def _failed(self, key: str, what: str, first: int | None) -> ReplayFailed:
        nearest = self.timeline.before(first) if first is not None else None
        return ReplayFailed(f"object {key} {what}{nearest_hint(nearest)}", object=key,
                            nearest=nearest)

    @staticmethod
    def _first(key: str) -> int | None:
        try:
            if is_part_key(key):
                return int(parse_part_key(key).lsn)
            if is_snapshot_key(key):
                return int(parse_snapshot_key(key).lsn)
            return int(parse_segment_key(key).first)
        except ValueError:
            return None

    async def stored(self, key: str) -> bytes:
        """The stored (encrypted) bytes of *key*; a missing object or a store error is a
        `ReplayFailed` naming it."""
        try:
            data = await self.store.get(key)
        except NotFound:
            raise self._failed(key, "is missing from the store", self._first(key)) from None
        except StoreError as exc:
            raise ReplayFailed(f"cannot read object {key}: {exc}", object=key) from None
        self.bytes_read += len(data)
        self.objects_read += 1
        return data

    def _unreadable(self, key: str, exc: Exception) -> ReplayFailed:
        """What is wrong with *key*, from an error raised while decrypting or decoding it."""
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, CryptoError):
            cause = cause.__cause__ or cause.__context__
        first = self._first(key)
        if isinstance(cause, UnknownKey):
            return self._failed(key, f"is encrypted with key {cause.key_name!r}, which is not "
                                "in the keyring (set REPLICATOR_KEK_<NAME> or the keyring "
                                "file)", first)
        if isinstance(cause, CryptoError) and not isinstance(exc, PartCorrupt):
            return self._failed(key, f"cannot be decrypted: {cause}", first)
        return self._failed(key, f"is corrupt: {exc}", first)

    async def fetch(self, key: str) -> bytes:
        """The decrypted bytes of *key* (small objects: schemas, transaction records)."""
        data = await self.stored(key)
        try:
            return decrypt(data, key, self.keyring)
        except CryptoError as exc:
            raise self._unreadable(key, exc) from None

    async def segment(self, key: str, after: int | None = None
                      ) -> tuple[SegmentHeader, Iterator[dict[str, Any]]]:
        """The header and verified records of change segment *key*, decrypted while they are
        decoded (the plaintext is never held whole); errors name the object. With *after*,
        blocks of records all at or below that LSN are passed over (`decode_record_segment`)."""
        return self.open_segment(key, await self.stored(key), after)

    def open_segment(self, key: str, data: bytes, after: int | None = None
                     ) -> tuple[SegmentHeader, Iterator[dict[str, Any]]]:
        """`segment()` of the stored bytes *data* of *key*."""
        try:
            header, records = decode_record_segment(
                chunk_stream(decrypt_stream((data,), name=key, keyring=self.keyring)), after)
        except (CryptoError, SegmentError) as exc:
            raise self._unreadable(key, exc) from None

        def checked() -> Iterator[dict[str, Any]]:
            try:
                yield from records
            except (CryptoError, SegmentError) as exc:
                raise self._unreadable(key, exc) from None

        if header.key != without_digest(key):
            raise self._failed(key, f"holds {header.key}, not what its name says",
                               self._first(key))
        return header, checked()

    async def part(self, key: str) -> tuple[PartHeader, Iterator[list[str]]]:
        """The header and the body lines (in batches) of snapshot part *key*; errors name
        it."""
        return self.open_part(key, await self.stored(key))

    def open_part(self, key: str, data: bytes) -> tuple[PartHeader, Iterator[list[str]]]:
        """`part()` of the stored bytes *data* of *key*."""
        try:
            header, batches = decode_part(decrypt(data, key, self.keyring))
        except (CryptoError, PartCorrupt) as exc:
            raise self._unreadable(key, exc) from None
        first = self._first(key)

        def checked() -> Iterator[list[str]]:
            try:
                yield from batches
            except PartCorrupt as exc:
                raise self._failed(key, f"is corrupt: {exc}", first) from None

        try:
            name = parse_part_key(key)
        except ValueError:
            raise self._failed(key, "is not a snapshot part name", first) from None
        if (name.table, name.lsn, name.first_seq, name.last_seq) != (
                header.table, header.lsn, header.first_seq, header.last_seq):
            raise self._failed(key, "holds other rows than its name says", first)
        return header, checked()

    async def snapshot(self, key: str) -> SnapshotPart:
        """Compaction snapshot part *key*, decrypted, its header checked against its name;
        errors (also those its frames raise as they are read) name it."""
        data = await self.stored(key)
        first = self._first(key)
        try:
            part = SnapshotPart(decrypt(data, key, self.keyring))
        except (CryptoError, PartCorrupt) as exc:
            raise self._unreadable(key, exc) from None
        name = parse_snapshot_key(key)
        header = part.header
        if (name.table, name.lsn, name.number) != (header.table, header.lsn, header.part):
            raise self._failed(key, "holds another part than its name says", first)
        return part

    def snapshot_failed(self, key: str, exc: PartCorrupt) -> ReplayFailed:
        return self._failed(key, f"is corrupt: {exc}", self._first(key))

    async def _transaction_segments(self) -> AsyncIterator[Iterator[TransactionRecord]]:
        """The records of each transaction segment, in name order, decoded as they are
        read; errors name the object."""
        async for info in self.store.list(TRANSACTIONS):
            data = await self.fetch(info.key)
            try:
                _, records = decode_transaction_segment(data)
                yield _named_errors(records, partial(self._unreadable, info.key))
            except SegmentError as exc:
                raise self._unreadable(info.key, exc) from None

    async def read_timeline(self) -> Timeline:
        """The `Timeline` of every archived transaction record, read one segment at a time;
        it becomes `self.timeline`."""
        builder = TimelineBuilder()
        async for records in self._transaction_segments():
            builder.add(records)
        self.timeline = builder.build()
        return self.timeline

    async def transactions(self) -> list[TransactionRecord]:
        """Every archived transaction record (duplicates included), in name order."""
        out: list[TransactionRecord] = []
        async for records in self._transaction_segments():
            out.extend(records)
        return out


def _named_errors(records: Iterator[TransactionRecord],
                  named: Callable[[Exception], ReplayFailed]) -> Iterator[TransactionRecord]:
    """*records*, a `SegmentError` raised while they are read turned into *named*'s error."""
    try:
        yield from records
    except SegmentError as exc:
        raise named(exc) from None


# --- listings: what a store holds, from names alone ------------------------------------------


class UntrustedObject(OperatorError):
    """A checkpoint or gap object that this archive's keys did not seal (forged, damaged, or a
    checkpoint written before checkpoints were sealed); the message names it and what to do."""


#: Sealed checkpoints a sink keeps per destination and tier; it deletes older ones.
CHECKPOINTS_KEPT = 5


def checkpoint_document(destination: str, lsn: Lsn, tier: Tier | None = None, *,
                        written_at: float | None = None) -> bytes:
    """The plaintext of checkpoint object `checkpoint_key(destination, lsn, tier)`: JSON with
    the destination, tier, LSN and time. Stored encrypted under its name (`crypto.encrypt`),
    so that a checkpoint is trusted only when this archive's keys sealed it at that name."""
    return json.dumps({"destination": destination, "tier": tier.value if tier else "all",
                       "lsn": int(lsn), "lsn_text": str(lsn),
                       "written_at": time.time() if written_at is None else written_at},
                      sort_keys=True).encode()


def _untrusted(key: str, what: str) -> UntrustedObject:
    where = key.rsplit("/", 1)[0]
    if key.startswith(GAPS):
        hint = ("if it is not yours, delete it: a gap the capture recorded is in its state "
                "topic, and the sink writes it again")
    else:
        hint = ("checkpoints written before they were sealed are refused too: check the "
                f"archive, then delete the unsealed objects under {where}/ and restart the "
                "sink, which goes on from its committed offsets and writes a sealed "
                "checkpoint at its next flush")
    return UntrustedObject(f"object {key} {what}, so it is not trusted; {hint}")


async def _sealed(store: ObjectStore, key: str, keyring: Keyring) -> dict[str, Any]:
    """The JSON content of checkpoint or gap *key*, decrypted with its name bound;
    `UntrustedObject` when it is empty, not sealed at this name, or not JSON."""
    data = await store.get(key)
    if not data:
        raise _untrusted(key, "is empty (not sealed)")
    try:
        doc = json.loads(decrypt(data, key, keyring))
    except UnknownKey as exc:
        raise ReplayFailed(f"object {key} is encrypted with key {exc.key_name!r}, which is not "
                           "in the keyring (set REPLICATOR_KEK_<NAME> or the keyring file)",
                           object=key) from None
    except (CryptoError, ValueError) as exc:
        raise _untrusted(key, f"is not sealed by this archive's keys ({exc})") from None
    if not isinstance(doc, dict):
        raise _untrusted(key, "does not hold a JSON object")
    return doc


async def checkpoint(store: ObjectStore, destination: str, tier: Tier | None = None, *,
                     keyring: Keyring) -> Lsn:
    """The destination's newest checkpoint (overall, or of one tier); `INVALID_LSN` when it
    has none. The newest object is decrypted and must record the LSN its name says
    (`UntrustedObject` otherwise: a forged name must not move a restore's latest point)."""
    newest: tuple[Lsn, str] | None = None
    async for info in store.list(checkpoints_prefix(destination, tier)):
        if not is_checkpoint_key(info.key, destination, tier):
            continue
        try:
            lsn = parse_checkpoint_key(info.key)
        except ValueError as exc:
            raise _untrusted(info.key, f"has no checkpoint name ({exc})") from None
        if newest is None or lsn > newest[0]:
            newest = (lsn, info.key)
    if newest is None:
        return INVALID_LSN
    lsn, key = newest
    doc = await _sealed(store, key, keyring)
    expected = (destination, tier.value if tier else "all", int(lsn))
    if (doc.get("destination"), doc.get("tier"), doc.get("lsn")) != expected:
        raise _untrusted(key, f"records LSN {doc.get('lsn')} of {doc.get('destination')!r}/"
                         f"{doc.get('tier')}, not what its name says")
    return lsn


async def checkpoint_names(store: ObjectStore, destination: str,
                           tier: Tier | None = None) -> list[tuple[Lsn, str]]:
    """The destination's checkpoint objects (of one tier, or overall), oldest first, from
    their names alone (for pruning; names that do not parse are left out)."""
    found = []
    async for info in store.list(checkpoints_prefix(destination, tier)):
        if is_checkpoint_key(info.key, destination, tier):
            with contextlib.suppress(ValueError):
                found.append((parse_checkpoint_key(info.key), info.key))
    return sorted(found)


async def destinations(store: ObjectStore) -> set[str]:
    """The destinations that have written a checkpoint into *store*."""
    return {destination_of(info.key) async for info in store.list(checkpoints_prefix())}


async def recorded_gaps(store: ObjectStore, keyring: Keyring) -> list[tuple[Lsn, Lsn]]:
    """The gaps the destination has archived, sorted. Each is decrypted and must record the
    range its name says (`UntrustedObject` otherwise)."""
    gaps = []
    async for info in store.list(GAPS):
        start, end = parse_gap_key(info.key)
        doc = await _sealed(store, info.key, keyring)
        if (doc.get("from_lsn"), doc.get("to_lsn")) != (int(start), int(end)):
            raise _untrusted(info.key, "records another range than its name says")
        gaps.append((start, end))
    return sorted(gaps)


async def dead_letters(store: ObjectStore) -> list[str]:
    """The names of the records a sink parked as undecodable (`deadletters/`), in order."""
    return [info.key async for info in store.list(DEAD_LETTERS)]


async def schema_versions(store: ObjectStore, table: str) -> list[tuple[Lsn, str]]:
    """The archived schemas of *table*: (from LSN, object name), oldest first."""
    found = [(parse_schema_key(info.key), info.key)
             async for info in store.list(schemas_prefix(table))]
    return sorted(found)
