"""pgoutput messages -> committed transactions of `ChangeEvent`s.

Only committed work leaves this module. The assembler buffers a transaction's changes until
its Commit (or, for changes streamed before commit under protocol 2+, until Stream Commit;
for two-phase transactions, until Commit Prepared), then gives each change its position
`(commit_lsn, seq)` and emits a `TransactionRecord` counting the changes per table.

- A Stream Abort discards the streamed changes of the aborted (sub)transaction; the others of
  the same top-level transaction stay.
- Relation messages replace the cached relation, so a schema change applies to later rows.
  They arrive again after every reconnect, so the cache needs no persistence.
- Before images follow the replica identity: with DEFAULT/INDEX the old tuple holds only the
  key columns (and is sent only when the key changes); with FULL it is the whole old row.
- An unchanged TOAST value is left out of `after` and named in `unchanged`; when the FULL old
  row carries it, it is filled from there, since it is by definition the same value.
- Logical decoding messages are not changes: they go to `on_message` (heartbeats), except
  the DDL triggers' transactional descriptions (`source.ddl`), which stay with their
  transaction (`Committed.ddl`; a streamed subtransaction's abort drops its own).
- A large transaction is not held whole in memory. `bound_memory()` (the capture calls it
  once per batch of messages, so nothing is added per message) measures each open
  transaction's decoded changes; past `spill_bytes` (`source.spill_threshold_mb`, 64 MB by
  default) the transaction's further changes go, undecoded, to a temporary file: each one
  length-prefixed with its subtransaction and table version, then its pgoutput bytes
  (`pgoutput.encode`); no pickle. The file is made 0600 in a fresh 0700 directory under
  `spill_dir` (`source.spill_dir`, else `TMPDIR`) and unlinked at once, so it never outlives
  the process, even one killed; its descriptor is closed at commit, abort or reconnect. At
  commit, `Committed.events` is a `SpilledEvents`: the changes held in memory, then the
  file's read back in order and decoded one at a time while they are published (a Stream
  Abort of a subtransaction skips that subtransaction's records). Whether the server spills
  on its own disk (`streaming` off) or streams the transaction as it goes (`streaming` on),
  the capture's memory stays near the threshold plus one batch.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

from replicator.errors import ReplicatorError
from replicator.events import (
    ChangeEvent,
    Op,
    TransactionRecord,
    is_restore_staging,
    join_qualified,
)
from replicator.position import ChangePosition, Lsn
from replicator.source import pgoutput as pg
from replicator.source.ddl import DDL_PREFIX
from replicator.source.values import RowDecoder, TypeRegistry

log = logging.getLogger(__name__)

_UNCHANGED = pg.UNCHANGED
#: Default spill threshold: a transaction's decoded changes past this go to disk.
SPILL_BYTES = 64 << 20
_EPOCH_SHIFT_US = 946_684_800_000_000  # 2000-01-01 - 1970-01-01 in microseconds


class CaptureError(ReplicatorError):
    """A change that cannot be turned into an event; names the table and what to do."""


@dataclass(slots=True)
class Committed:
    """One committed transaction, ready to publish."""

    record: TransactionRecord
    events: list[ChangeEvent] | SpilledEvents
    #: Relation messages received since the previous commit (a table's schema as it is used
    #: from here on; the server also resends them after every reconnect).
    relations: tuple[pg.Relation, ...] = ()
    #: The transaction's DDL descriptions (`source.ddl`: the event triggers' transactional
    #: logical messages), in order.
    ddl: tuple[bytes, ...] = ()


@dataclass(slots=True)
class _Table:
    relation: pg.Relation
    decoder: RowDecoder
    schema: str
    name: str
    key_index: tuple[int, ...]
    names: tuple[str, ...]
    qualified: str
    key_names: tuple[str, ...]  # the names of `key_index`


@dataclass(slots=True)
class _Open:
    xid: int
    commit_ts: int = 0
    origin: str | None = None
    prepare_lsn: Lsn | None = None
    # (subxid, event-without-position); subxid is only meaningful for streamed transactions
    changes: list[tuple[int, ChangeEvent]] = field(default_factory=list)
    measured: int = 0  # how many of `changes` `size` counts
    size: int = 0  # approximate bytes of the decoded changes held
    spill: _Spill | None = None  # where the changes after the first `size` bytes go
    ddl: list[tuple[int, bytes]] = field(default_factory=list)  # (subxid, DDL description)


class Assembler:
    def __init__(
        self,
        *,
        db: str,
        registry: TypeRegistry | None = None,
        primary_keys: dict[str, tuple[str, ...]] | None = None,
        on_message: Callable[[pg.LogicalMessage], None] | None = None,
        spill_bytes: int = SPILL_BYTES,
        spill_dir: str | None = None,
        skip_replicated: bool = False,
    ) -> None:
        self.db = db
        # Leave out the changes of transactions with a replication origin (replicated in:
        # `source.replicated_changes = "skip"` where the server cannot filter them).
        self.skip_replicated = skip_replicated
        self.registry = registry or TypeRegistry()
        self.primary_keys = primary_keys or {}
        self.on_message = on_message
        self.spill_bytes = spill_bytes
        self.spill_dir = spill_dir
        self.tables: dict[int, _Table] = {}
        #: "schema.table" -> column -> base type name, which the encoder needs (json vs text...)
        self.column_kinds: dict[str, dict[str, str]] = {}
        self._current: _Open | None = None
        self._streams: dict[int, _Open] = {}
        self._prepared: dict[str, _Open] = {}
        self._stream_xid: int | None = None
        self._relations: list[pg.Relation] = []
        #: Relations capture leaves out (a replay's staging tables, `is_restore_staging`):
        #: their rows are dropped here, whatever the publication.
        self.ignored: set[int] = set()

    # --- state the capture loop needs -----------------------------------------------------

    @property
    def idle(self) -> bool:
        """No transaction is open, streamed or prepared: a keepalive LSN may be confirmed."""
        return self._current is None and not self._streams and not self._prepared

    def confirm_floor(self) -> Lsn | None:
        """The slot must not be confirmed at or past this LSN: a prepared transaction that is
        not yet committed would not be sent again."""
        lsns = [tx.prepare_lsn for tx in self._prepared.values() if tx.prepare_lsn is not None]
        return min(lsns) if lsns else None

    def reset(self) -> None:
        """Forget open transactions, as after a reconnect (the server resends them whole)."""
        for tx in (self._current, *self._streams.values(), *self._prepared.values()):
            if tx is not None and tx.spill is not None:
                tx.spill.close()
        self._current = None
        self._stream_xid = None
        self._streams.clear()
        self._prepared.clear()
        self._sync_row()

    # --- large transactions ---------------------------------------------------------------

    def bound_memory(self) -> None:
        """Spill each open transaction whose decoded changes outgrew `spill_bytes`. Called
        between batches of messages: the changes are measured here, once each, never on the
        per-message path, so a transaction passes the threshold by at most one batch."""
        if self._current is not None and self._current.spill is None:
            self._measure(self._current)
        for tx in self._streams.values():
            if tx.spill is None:
                self._measure(tx)

    def _measure(self, tx: _Open) -> None:
        changes, size = tx.changes, tx.size
        for i in range(tx.measured, len(changes)):
            size += _approx_size(changes[i][1])
        tx.measured, tx.size = len(changes), size
        if size > self.spill_bytes:
            tx.spill = _Spill(self.spill_dir, tx.xid)
            log.info("transaction %d holds %d changes (about %d MB) in memory: spilling its "
                     "further changes to a temporary file", tx.xid, len(changes), size >> 20)
            self._sync_row()

    def _sync_row(self) -> None:
        """Row messages go through `_row_spilling` exactly while an open transaction spills:
        an instance attribute over the method, so the common path pays not even a test."""
        spilling = (self._current is not None and self._current.spill is not None) or any(
            tx.spill is not None for tx in self._streams.values())
        if spilling:
            self._row = self._row_spilling  # type: ignore[method-assign]
        else:
            vars(self).pop("_row", None)

    def _row_spilling(self, message: pg.Insert | pg.Update | pg.Delete) -> None:
        if message.relation_oid in self.ignored:
            return
        tx = self._open_for(message.xid)
        if tx is None or tx.spill is None:
            Assembler._row(self, message)
            return
        tx.spill.write(message.xid or tx.xid, self._table(message.relation_oid), message)

    # --- messages -------------------------------------------------------------------------

    def feed(self, message: pg.PgOutputMessage) -> Committed | None:
        """Apply one decoded message; returns a transaction when one commits."""
        kind = type(message)
        if kind is _UPDATE or kind is _INSERT or kind is _DELETE:
            self._row(message)  # type: ignore[arg-type]
            return None
        if kind is _BEGIN:
            assert isinstance(message, pg.Begin)
            self._current = _Open(message.xid, message.commit_ts, None, None, [], 0, 0, None, [])
            return None
        if kind is _COMMIT:
            assert isinstance(message, pg.Commit)
            tx, self._current = self._current, None
            if tx is None:
                raise CaptureError(f"Commit at {message.commit_lsn} without a Begin")
            return self._finish(tx, message.commit_lsn, message.end_lsn, message.commit_ts)
        if kind is pg.Relation:
            assert isinstance(message, pg.Relation)
            self._relation(message)
        elif kind is pg.Type:
            assert isinstance(message, pg.Type)
            self.registry.observe(message)
        elif kind is pg.Truncate:
            assert isinstance(message, pg.Truncate)
            self._truncate(message)
        elif kind is pg.Origin:
            assert isinstance(message, pg.Origin)
            tx = self._open_for(None)
            if tx is not None:
                tx.origin = message.name
        elif kind is pg.LogicalMessage:
            assert isinstance(message, pg.LogicalMessage)
            if message.transactional and message.prefix == DDL_PREFIX:
                tx = self._open_for(message.xid)
                if tx is not None:
                    tx.ddl.append((message.xid or tx.xid, message.content))
            elif self.on_message is not None:
                self.on_message(message)
        else:
            return self._control(message)
        return None

    def _control(self, message: pg.PgOutputMessage) -> Committed | None:
        if isinstance(message, pg.StreamStart):
            self._streams.setdefault(message.xid, _Open(message.xid))
            self._stream_xid = message.xid
        elif isinstance(message, pg.StreamStop):
            self._stream_xid = None
        elif isinstance(message, pg.StreamCommit):
            streamed = self._streams.pop(message.xid, None) or _Open(message.xid)
            return self._finish(streamed, message.commit_lsn, message.end_lsn, message.commit_ts)
        elif isinstance(message, pg.StreamAbort):
            aborted = self._streams.get(message.xid)
            if aborted is not None:
                if message.subxid == message.xid:
                    del self._streams[message.xid]
                    if aborted.spill is not None:
                        aborted.spill.close()
                        self._sync_row()
                else:
                    aborted.changes = [c for c in aborted.changes if c[0] != message.subxid]
                    aborted.ddl = [d for d in aborted.ddl if d[0] != message.subxid]
                    aborted.measured = aborted.size = 0
                    if aborted.spill is not None:
                        aborted.spill.abort(message.subxid)
        elif isinstance(message, pg.BeginPrepare):
            self._current = _Open(message.xid, message.prepare_ts)
        elif isinstance(message, pg.Prepare):
            prepared, self._current = self._current, None
            if prepared is not None:
                prepared.prepare_lsn = message.prepare_lsn
                self._prepared[message.gid] = prepared
                self._sync_row()
        elif isinstance(message, pg.StreamPrepare):
            streamed_prepared = self._streams.pop(message.xid, None)
            if streamed_prepared is not None:
                streamed_prepared.prepare_lsn = message.prepare_lsn
                self._prepared[message.gid] = streamed_prepared
                self._sync_row()
        elif isinstance(message, pg.CommitPrepared):
            done = self._prepared.pop(message.gid, None)
            if done is None:
                # Prepared before this connection started: the server sends the whole
                # transaction again only if its prepare was not confirmed, which the capture
                # loop guarantees by never confirming past `confirm_floor`.
                log.warning("COMMIT PREPARED %s at %s without its prepared changes",
                            message.gid, message.commit_lsn)
                done = _Open(message.xid)
            return self._finish(done, message.commit_lsn, message.end_lsn, message.commit_ts)
        elif isinstance(message, pg.RollbackPrepared):
            rolled_back = self._prepared.pop(message.gid, None)
            if rolled_back is not None and rolled_back.spill is not None:
                rolled_back.spill.close()
        return None

    def _relation(self, rel: pg.Relation) -> None:
        if is_restore_staging(rel.namespace):
            self.ignored.add(rel.oid)
            self.tables.pop(rel.oid, None)
            return
        qualified = join_qualified(rel.namespace, rel.name)
        names = tuple(c.name for c in rel.columns)
        key = tuple(i for i, c in enumerate(rel.columns) if c.flags_key)
        primary = self.primary_keys.get(qualified)
        if rel.replica_identity == "f" or not key:
            # FULL marks every column as key; the row's identity is still its primary key.
            key = tuple(names.index(n) for n in primary) if primary else key
        if not key:
            raise CaptureError(
                f"table {qualified} has no primary key or replica identity: its updates and "
                f"deletes cannot be told apart; add a primary key or run ALTER TABLE "
                f"{qualified} REPLICA IDENTITY FULL")
        decoder = RowDecoder.from_relation(rel, self.registry)
        self._relations.append(rel)
        self.column_kinds[qualified] = column_types(rel.columns, self.registry)
        self.tables[rel.oid] = _Table(rel, decoder, rel.namespace, rel.name, key, names,
                                      qualified, tuple(names[i] for i in key))

    def _table(self, oid: int) -> _Table:
        table = self.tables.get(oid)
        if table is None:
            raise CaptureError(f"change for relation OID {oid} before its Relation message")
        return table

    def _open_for(self, xid: int | None) -> _Open | None:
        if xid is None:
            return self._current
        top = self._stream_xid if self._stream_xid is not None else xid
        tx = self._streams.get(top)
        if tx is None:
            tx = self._streams[top] = _Open(top)
        return tx

    def _row(self, message: pg.Insert | pg.Update | pg.Delete) -> None:
        table = self.tables.get(message.relation_oid)
        if table is None:
            if message.relation_oid in self.ignored:
                return
            table = self._table(message.relation_oid)
        xid = message.xid
        tx = self._current if xid is None else self._open_for(xid)
        if tx is None:
            raise CaptureError(f"row change on {table.qualified} outside a transaction")
        names = table.names
        before: dict[str, Any] | None = None
        after: dict[str, Any] | None = None
        unchanged: tuple[str, ...] = ()
        kind = type(message)
        if kind is _UPDATE:
            op = _OP_UPDATE
            message = cast(pg.Update, message)
            values = table.decoder.decode(message.new)
            if message.old is not None:
                before = _image(names, table.decoder.decode(message.old), message.old_kind,
                                table.key_index)
            if _UNCHANGED not in values:
                after = dict(zip(names, values, strict=True))
            else:
                after = {}
                missing = []
                for name, value in zip(names, values, strict=True):
                    if value is _UNCHANGED:
                        if before is not None and message.old_kind == "O" \
                                and before.get(name, _UNCHANGED) is not _UNCHANGED:
                            after[name] = before[name]
                        else:
                            missing.append(name)
                    else:
                        after[name] = value
                unchanged = tuple(missing)
            source = after
        elif kind is _INSERT:
            op = _OP_CREATE
            message = cast(pg.Insert, message)
            after = dict(zip(names, table.decoder.decode(message.new), strict=True))
            source = after
        else:
            op = _OP_DELETE
            message = cast(pg.Delete, message)
            before = _image(names, table.decoder.decode(message.old), message.old_kind,
                            table.key_index)
            source = before
        key_names = table.key_names
        if len(key_names) == 1:
            name = key_names[0]
            key = {name: source.get(name)}
        else:
            key = {name: source.get(name) for name in key_names}
        event = ChangeEvent(op, table.schema, table.name, _NO_POSITION, 0, tx.xid, key,
                            before, after, unchanged, None, self.db, qualified=table.qualified)
        tx.changes.append((xid or tx.xid, event))

    def _truncate(self, message: pg.Truncate) -> None:
        tx = self._open_for(message.xid)
        if tx is None:
            raise CaptureError("TRUNCATE outside a transaction")
        for oid in message.relation_oids:
            if oid in self.ignored:
                continue
            table = self._table(oid)
            if tx.spill is not None:
                tx.spill.write(message.xid or tx.xid, table,
                               message._replace(relation_oids=(oid,), xid=None))
                continue
            event = ChangeEvent(Op.TRUNCATE, table.schema, table.name, _NO_POSITION, 0, tx.xid,
                                {}, None, None, (), None, self.db, qualified=table.qualified)
            tx.changes.append((message.xid or tx.xid, event))

    def _finish(self, tx: _Open, commit_lsn: Lsn, end_lsn: Lsn, commit_ts: int) -> Committed:
        commit_us = commit_ts + _EPOCH_SHIFT_US
        if self.skip_replicated and tx.origin is not None:  # replicated in: left out
            tx.changes.clear()
            if tx.spill is not None:
                tx.spill.close()
                tx.spill = None
        counts: dict[str, int] = {}
        events = []
        origin = tx.origin
        for seq, (_, event) in enumerate(tx.changes):
            event.position = _position(ChangePosition, (commit_lsn, seq))
            event.commit_ts_us = commit_us
            event.origin = origin
            qualified = event.qualified
            counts[qualified] = counts.get(qualified, 0) + 1
            events.append(event)
        record = TransactionRecord(commit_lsn, end_lsn, commit_us, tx.xid, counts, origin, {}, {})
        if self._relations:
            relations, self._relations = tuple(self._relations), []
        else:
            relations = ()
        ddl = tuple([content for _, content in tx.ddl]) if tx.ddl else ()
        if tx.spill is None:
            return Committed(record, events, relations, ddl)
        spill, tx.spill = tx.spill, None
        self._sync_row()
        for per_table in spill.counts.values():
            for qualified, n in per_table.items():
                counts[qualified] = counts.get(qualified, 0) + n
        replay = Assembler(db=self.db, registry=self.registry, primary_keys=self.primary_keys)
        return Committed(record, SpilledEvents(events, spill, replay, record), relations, ddl)


_NO_POSITION = ChangePosition(Lsn(0), -1)
_position: Any = tuple.__new__  # a ChangePosition without its Python-level __new__
_BEGIN, _COMMIT = pg.Begin, pg.Commit
_INSERT, _UPDATE, _DELETE = pg.Insert, pg.Update, pg.Delete
_OP_CREATE, _OP_UPDATE, _OP_DELETE = Op.CREATE, Op.UPDATE, Op.DELETE

# Python's own overhead of one held change (the event, its row dicts, the key), roughly, and
# of one column value in a row dict.
_EVENT_OVERHEAD = 400
_VALUE_OVERHEAD = 50
# A spilled change: its pgoutput bytes' length, its subtransaction, its table version.
_RECORD = struct.Struct(">QII")


def _approx_size(event: ChangeEvent) -> int:
    size = _EVENT_OVERHEAD
    for row in (event.before, event.after):
        if row is not None:
            for value in row.values():
                size += _VALUE_OVERHEAD + (len(value) if isinstance(value, str | bytes) else 0)
    return size


class _Spill:
    """One transaction's spilled changes: an unlinked 0600 temporary file (see the module
    docstring), written as its changes arrive and read back once, in order, at commit."""

    def __init__(self, directory: str | None, xid: int) -> None:
        self.xid = xid
        self.tables: list[_Table] = []  # the table versions the records name, by index
        self._index: dict[int, int] = {}  # id(table version) -> its index
        self.counts: dict[int, dict[str, int]] = {}  # subxid -> table -> spilled changes
        self.aborted: set[int] = set()
        try:
            private = tempfile.mkdtemp(prefix="wedsync-spill-", dir=directory)
            try:
                fd, path = tempfile.mkstemp(suffix=".changes", dir=private)
                os.unlink(path)
            finally:
                os.rmdir(private)
            self.file: IO[bytes] = os.fdopen(fd, "w+b", buffering=1 << 20)
        except OSError as exc:
            raise self._error(exc, directory) from None
        self.directory = directory

    def _error(self, exc: OSError, directory: str | None) -> CaptureError:
        where = directory or tempfile.gettempdir()
        return CaptureError(
            f"cannot spill large transaction {self.xid} to a temporary file in {where}: "
            f"{exc.strerror or exc}; make room there or set source.spill_dir")

    def write(self, subxid: int, table: _Table, message: pg.Insert | pg.Update | pg.Delete
              | pg.Truncate) -> None:
        index = self._index.get(id(table))
        if index is None:
            index = self._index[id(table)] = len(self.tables)
            self.tables.append(table)
        body = pg.encode(message)
        try:
            self.file.write(_RECORD.pack(len(body), subxid, index))
            self.file.write(body)
        except OSError as exc:
            raise self._error(exc, self.directory) from None
        per_table = self.counts.get(subxid)
        if per_table is None:
            per_table = self.counts[subxid] = {}
        per_table[table.qualified] = per_table.get(table.qualified, 0) + 1

    def abort(self, subxid: int) -> None:
        """A Stream Abort of one subtransaction: its records are skipped on reading."""
        self.aborted.add(subxid)
        self.counts.pop(subxid, None)

    def read(self) -> Iterator[tuple[_Table, bytes]]:
        """The records not aborted, in the order written."""
        file = self.file
        try:
            file.flush()
            file.seek(0)
            while head := file.read(_RECORD.size):
                if len(head) != _RECORD.size:
                    raise CaptureError(f"the spill file of transaction {self.xid} is cut short")
                length, subxid, index = _RECORD.unpack(head)
                body = file.read(length)
                if len(body) != length:
                    raise CaptureError(f"the spill file of transaction {self.xid} is cut short")
                if subxid not in self.aborted:
                    yield self.tables[index], body
        except OSError as exc:
            raise self._error(exc, self.directory) from None

    def close(self) -> None:
        self.file.close()

    def __del__(self) -> None:
        # A transaction dropped without commit or abort (a failed publish, a lost
        # connection): its descriptor goes with it.
        file = getattr(self, "file", None)
        if file is not None:
            file.close()


class SpilledEvents:
    """The events of a transaction that spilled: those held in memory, then the spilled ones
    read back and decoded one at a time as they are iterated, positioned after them. Iterate
    once; the file is closed at the end (or when this is dropped)."""

    def __init__(self, head: list[ChangeEvent], spill: _Spill, replay: Assembler,
                 record: TransactionRecord) -> None:
        self._head = head
        self._spill: _Spill | None = spill
        self._replay = replay  # a private assembler: the spilled rows go through its `_row`
        self._record = record
        self._first = len(head)  # the position of the first spilled change
        self._count = len(head) + sum(n for per in spill.counts.values() for n in per.values())

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[ChangeEvent]:
        spill, self._spill = self._spill, None
        if spill is None:
            raise RuntimeError("the events of a spilled transaction are read only once")
        try:
            yield from self._head
            self._head = []
            record, replay = self._record, self._replay
            commit_lsn, commit_us, origin = record.commit_lsn, record.commit_ts_us, record.origin
            tx = replay._current = _Open(record.xid)
            decoder = pg.Decoder(binary=True)
            seq = self._first
            for table, body in spill.read():
                message = decoder.decode(body)
                replay.tables[table.relation.oid] = table
                if type(message) is pg.Truncate:
                    replay._truncate(message)
                else:
                    replay._row(message)  # type: ignore[arg-type]
                _, event = tx.changes.pop()
                event.position = ChangePosition(commit_lsn, seq)
                event.commit_ts_us = commit_us
                event.origin = origin
                seq += 1
                yield event
        finally:
            spill.close()


def column_types(columns: Iterable[tuple[str, int]] | Iterable[pg.Column],
                 registry: TypeRegistry) -> dict[str, str]:
    """Column name -> Postgres base type name, for the encoder."""
    out: dict[str, str] = {}
    for column in columns:
        name, oid = ((column.name, column.type_oid) if isinstance(column, pg.Column)
                     else column)
        type_name = registry.base_type_name(oid)
        if type_name is not None:
            out[name] = type_name
    return out


def _image(names: tuple[str, ...], values: Iterable[object], kind: str | None,
           key_index: tuple[int, ...]) -> dict[str, Any]:
    """The before image: the whole old row (FULL), or only its key columns (DEFAULT/INDEX)."""
    row = dict(zip(names, values, strict=True))
    if kind == "O":
        return {k: v for k, v in row.items() if v is not _UNCHANGED}
    return {names[i]: row[names[i]] for i in key_index}
