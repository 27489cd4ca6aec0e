"""Compaction snapshots: a table's full state at one LSN, in the form a restore loads fastest.

Compaction (`replicator.replay.compact`) folds a table's base snapshot and every change up to
an LSN into a new snapshot, so that a restore at or after that LSN reads it and only the
changes after it. Names (`replicator.replay.plan` plans from them):

    snapshots/<table>/<lsn>/part-<n>.snap       n = 0, 1, ...: the rows, split by wedding
    snapshots/<table>/<lsn>/manifest-<count>.json   written last: the snapshot is complete

A snapshot without its manifest (a compaction cut short) is never used; the manifest's name
carries the number of parts, so a missing part is seen from the listing alone. Rows are
spread over the parts by a hash of their wedding id (`bucket_of`), all rows of a wedding in
one part, so a wedding restore reads one part of each table, found from the headers.

Layout of a part (before encryption, which is the same as for every object):

    b"WSS1" | header length (4 bytes, big-endian) | header (JSON) | rows | keys | weddings

Three zstd frames, each one line per row, in the same order. The **rows** frame is pure
Postgres COPY text, in the header's column order: a restore streams it into `COPY ... FROM
STDIN` without touching a line. The **keys** frame holds each row's key text (the key
columns' Postgres text joined by U+001F, COPY-escaped, as snapshot-part lines hold it,
`archive.part.pg_key_text`): a restore with changes after the snapshot finds the rows they replace
by set operations on it, not by reading rows. The **weddings** frame holds each row's wedding
id (COPY-escaped, `\\N` for none). The header: `format`, `table`, `lsn`, `part`, `parts`,
`rows`, `columns`, `key`, `key_kinds` (`long`, `string`, `uuid`, `numeric`: the canonical key
form the text gives back exactly), `rows_frame` and `keys_frame` (byte lengths),
`wedding_ids` (sorted) or `wedding_bloom` (above `MAX_WEDDING_IDS`), `codec`, `frame_bytes`
(the three frames' sizes decompressed; absent from parts written before it existed). Each frame
is decompressed in bounded chunks and must produce exactly its `frame_bytes` (without them, at
most `rows` times `bounded.MAX_ROW_TEXT_BYTES`): a corrupt or hostile frame cannot expand
without bound (`archive.bounded`).

The manifest (JSON): `format`, `table`, `lsn`, `parts`, `rows` (per part and in total),
`columns`, `created_at`, `from` (the objects folded in: count and bytes).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from replicator.archive.bloom import Bloom, may_hold
from replicator.archive.bounded import legacy_limit, zstd_chunks
from replicator.archive.part import MAX_WEDDING_IDS, PartCorrupt, framed_header, unescape
from replicator.position import Lsn

__all__ = ["SnapshotHeader", "SnapshotPart", "SnapshotWriter", "bucket_of"]

MAGIC: Final = b"WSS1"
FORMAT: Final = 1
_FLUSH: Final = 256 << 10  # characters of a bucket's lines gathered before compressing
KEY_KINDS: Final = ("long", "string", "uuid", "numeric")


def bucket_of(wedding_field: str, parts: int) -> int:
    """The part that holds the rows of a wedding (its index-line field, COPY-escaped)."""
    return zlib.crc32(wedding_field.encode()) % parts if parts > 1 else 0


# --- one part --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    table: str
    lsn: Lsn
    part: int
    parts: int
    rows: int
    columns: tuple[str, ...]
    key: tuple[str, ...]
    key_kinds: tuple[str, ...]
    rows_frame: int
    keys_frame: int
    wedding_ids: tuple[str, ...] | None
    wedding_bloom: str | None
    # rows, keys, weddings frames decompressed; None in older parts
    frame_bytes: tuple[int, int, int] | None = None

    def may_hold_wedding(self, wedding_id: str) -> bool:
        return may_hold(wedding_id, self.wedding_ids, self.wedding_bloom)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
               "format": FORMAT, "table": self.table, "lsn": int(self.lsn), "part": self.part,
               "parts": self.parts, "rows": self.rows, "columns": list(self.columns),
               "key": list(self.key), "key_kinds": list(self.key_kinds),
               "rows_frame": self.rows_frame, "keys_frame": self.keys_frame,
               "wedding_ids": None if self.wedding_ids is None else list(self.wedding_ids),
               "wedding_bloom": self.wedding_bloom, "codec": "zstd"}
        if self.frame_bytes is not None:
            doc["frame_bytes"] = list(self.frame_bytes)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SnapshotHeader:
        try:
            doc = json.loads(raw)
            if doc["format"] > FORMAT:
                raise PartCorrupt(f"snapshot format {doc['format']} is newer than this "
                                  f"replicator reads ({FORMAT}): upgrade it")
            ids = doc["wedding_ids"]
            sizes = doc.get("frame_bytes")
            if sizes is not None and (len(sizes) != _FRAMES or any(
                    type(n) is not int or n < 0 for n in sizes)):
                raise ValueError("frame_bytes must be three sizes")
            return cls(str(doc["table"]), Lsn(doc["lsn"]), int(doc["part"]), int(doc["parts"]),
                       int(doc["rows"]), tuple(doc["columns"]), tuple(doc["key"]),
                       tuple(doc["key_kinds"]), int(doc["rows_frame"]), int(doc["keys_frame"]),
                       None if ids is None else tuple(ids), doc["wedding_bloom"],
                       None if sizes is None else (sizes[0], sizes[1], sizes[2]))
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, PartCorrupt):
                raise
            raise PartCorrupt(f"the snapshot part's header is not valid: "
                              f"{type(exc).__name__}") from None


def read_snapshot_header(data: bytes) -> tuple[SnapshotHeader, int]:
    raw, start = framed_header(data, MAGIC, "compaction snapshot part")
    return SnapshotHeader.from_json(raw), start


class SnapshotPart:
    """One decrypted part: its header and its three frames, read on demand and checked
    against the header (row counts, weddings); a mismatch raises `PartCorrupt`."""

    def __init__(self, data: bytes) -> None:
        self.header, start = read_snapshot_header(data)
        rows_end = start + self.header.rows_frame
        keys_end = rows_end + self.header.keys_frame
        if keys_end > len(data):
            raise PartCorrupt("the snapshot part ends inside its frames")
        view = memoryview(data)
        self._rows = view[start:rows_end]
        self._keys = view[rows_end:keys_end]
        self._weddings = view[keys_end:]

    def _frame_chunks(self, frame: memoryview, what: str) -> Iterator[bytes]:
        """The frame's decompressed chunks, no more than the header allows (module
        docstring)."""
        sizes = self.header.frame_bytes
        limit = (legacy_limit(self.header.rows) if sizes is None
                 else sizes[("rows", "keys", "weddings").index(what)])
        return zstd_chunks(frame, limit, f"the snapshot part's {what} frame", PartCorrupt,
                           exact=sizes is not None)

    def row_chunks(self) -> Iterator[bytes]:
        """The rows frame as decompressed chunks of COPY text (not cut at line ends); the row
        count is checked once the last chunk is out."""
        lines = 0
        last = b"\n"
        for chunk in self._frame_chunks(self._rows, "rows"):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
            yield chunk
        if lines != self.header.rows or (self.header.rows and last != b"\n"):
            raise PartCorrupt(f"the snapshot part holds {lines} rows, its header says "
                              f"{self.header.rows}")

    def _lines(self, frame: memoryview, what: str) -> list[str]:
        try:
            text = b"".join(self._frame_chunks(frame, what)).decode()
        except UnicodeDecodeError:
            raise PartCorrupt(f"the snapshot part's {what} frame is not UTF-8") from None
        lines = text.split("\n")
        if lines.pop() != "" or len(lines) != self.header.rows:
            raise PartCorrupt(f"the snapshot part's {what} frame holds {len(lines)} lines, "
                              f"its header says {self.header.rows} rows")
        return lines

    def row_lines(self) -> list[str]:
        return self._lines(self._rows, "rows")

    def row_bytes(self) -> list[bytes]:
        """The rows frame's lines as bytes, unparsed and not decoded."""
        lines = b"".join(self._frame_chunks(self._rows, "rows")).split(b"\n")
        if lines.pop() != b"" or len(lines) != self.header.rows:
            raise PartCorrupt(f"the snapshot part's rows frame holds {len(lines)} lines, "
                              f"its header says {self.header.rows} rows")
        return lines

    def key_lines(self) -> list[str]:
        """Each row's key text, COPY-escaped."""
        return self._lines(self._keys, "keys")

    def wedding_lines(self) -> list[str]:
        """Each row's wedding id, COPY-escaped (`\\N` for none), checked against the
        header's weddings."""
        lines = self._lines(self._weddings, "weddings")
        weddings = set(_unescape_all(set(lines) - {"\\N"}))
        header = self.header
        if header.wedding_ids is not None and not weddings <= set(header.wedding_ids):
            raise PartCorrupt("the snapshot part's weddings do not match its header")
        if header.wedding_bloom is not None:
            bloom = Bloom.from_text(header.wedding_bloom)
            if any(w not in bloom for w in weddings):
                raise PartCorrupt("the snapshot part's weddings do not match its header")
        return lines


# --- writing ---------------------------------------------------------------------------------


_FRAMES = 3  # rows, keys, weddings


@dataclass(slots=True)
class _Bucket:
    compressors: list[Any]  # zstd.ZstdCompressor per frame
    # per frame, the (offset, length) of its compressed pieces in the writer's spool file
    out: list[list[tuple[int, int]]] = field(
        default_factory=lambda: [[] for _ in range(_FRAMES)])
    lines: list[list[str]] = field(default_factory=lambda: [[] for _ in range(_FRAMES)])
    pending: int = 0
    count: int = 0
    sizes: list[int] = field(default_factory=lambda: [0] * _FRAMES)  # decompressed
    weddings: set[str] = field(default_factory=set)


class SnapshotWriter:
    """Gathers a table's rows (COPY text lines, key texts and wedding ids, COPY-escaped,
    without newlines) into *parts* wedding buckets, compressing as they come into one
    temporary spool file; `parts()` gives each part's bytes. Memory: up to `_FLUSH`
    characters of lines per bucket, and one part at a time (the caller chooses *parts* so
    that a part is a few MiB). A context manager: leaving it removes the spool."""

    def __init__(self, *, table: str, lsn: Lsn, columns: Sequence[str], key: Sequence[str],
                 key_kinds: Sequence[str], parts: int, level: int = 3) -> None:
        from backports import zstd

        unknown = [k for k in key_kinds if k not in KEY_KINDS]
        if unknown:
            raise ValueError(f"key kinds {unknown} cannot be held by a snapshot")
        self.table, self.lsn = table, lsn
        self.columns, self.key, self.key_kinds = tuple(columns), tuple(key), tuple(key_kinds)
        self.count = max(1, parts)
        self._buckets = [_Bucket([zstd.ZstdCompressor(level) for _ in range(_FRAMES)])
                         for _ in range(self.count)]
        self.rows = 0
        self._spool = tempfile.TemporaryFile(prefix="wedsync-snapshot-")  # noqa: SIM115 (close())

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()

    def add(self, rows: Sequence[str], keys: Sequence[str], weddings: Sequence[str]) -> None:
        buckets, count = self._buckets, self.count
        for row, key, wedding in zip(rows, keys, weddings, strict=True):
            bucket = buckets[bucket_of(wedding, count) if count > 1 else 0]
            lines = bucket.lines
            lines[0].append(row)
            lines[1].append(key)
            lines[2].append(wedding)
            bucket.pending += len(row)
            if wedding != "\\N":
                bucket.weddings.add(wedding)
            if bucket.pending >= _FLUSH:
                self._compress(bucket)
        self.rows += len(rows)

    def _compress(self, bucket: _Bucket) -> None:
        if not bucket.lines[0]:
            return
        bucket.count += len(bucket.lines[0])
        for n in range(_FRAMES):
            text = ("\n".join(bucket.lines[n]) + "\n").encode()
            bucket.sizes[n] += len(text)
            data = bucket.compressors[n].compress(text)
            if data:
                bucket.out[n].append((self._spool.tell(), len(data)))
                self._spool.write(data)
            bucket.lines[n] = []
        bucket.pending = 0

    def _read(self, pieces: list[tuple[int, int]]) -> bytes:
        fd = self._spool.fileno()
        self._spool.flush()
        return b"".join(os.pread(fd, length, offset) for offset, length in pieces)

    def parts(self) -> Iterator[tuple[int, bytes, SnapshotHeader]]:
        """Each part's number, bytes and header; buckets are released as they go."""
        from backports import zstd

        for n, bucket in enumerate(self._buckets):
            self._compress(bucket)
            frames = [self._read(bucket.out[i])
                      + bucket.compressors[i].flush(zstd.ZstdCompressor.FLUSH_FRAME)
                      for i in range(_FRAMES)]
            ids: tuple[str, ...] | None = tuple(sorted(_unescape_all(bucket.weddings)))
            bloom = None
            if ids is not None and len(ids) > MAX_WEDDING_IDS:
                bloom, ids = Bloom.of(ids).to_text(), None
            header = SnapshotHeader(self.table, self.lsn, n, self.count, bucket.count,
                                    self.columns, self.key, self.key_kinds, len(frames[0]),
                                    len(frames[1]), ids, bloom,
                                    (bucket.sizes[0], bucket.sizes[1], bucket.sizes[2]))
            raw = header.to_json()
            self._buckets[n] = _Bucket([])
            yield n, MAGIC + struct.pack(">I", len(raw)) + raw + b"".join(frames), header


def _unescape_all(fields: set[str]) -> list[str]:
    return [unescape(f) for f in fields]


def manifest(*, table: str, lsn: Lsn, headers: Sequence[SnapshotHeader],
             created_at: str, folded_objects: int, folded_bytes: int) -> bytes:
    doc = {"format": FORMAT, "table": table, "lsn": int(lsn), "parts": len(headers),
           "rows": sum(h.rows for h in headers), "part_rows": [h.rows for h in headers],
           "columns": list(headers[0].columns) if headers else [],
           "created_at": created_at,
           "from": {"objects": folded_objects, "bytes": folded_bytes}}
    return json.dumps(doc, sort_keys=True, indent=1).encode()
