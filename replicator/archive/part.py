"""Snapshot parts: a table's snapshot rows in the form a restore loads fastest.

A snapshot (op `r`) row carries no change, only the row as it was at the snapshot's LSN, and a
table's snapshot is by far the bulk of what a restore reads. So when everything a sink flushes
for one table is snapshot rows at one LSN, it writes them not as a change segment but as a
**part**, `snapshots/<table>/<lsn>/rows-<first seq>-<last seq>-<digest>.part`, whose body is
Postgres COPY text: a restore streams it into `COPY ... FROM STDIN` nearly untouched.

Layout (before encryption, which is the same as for every object):

    b"WSP1" | header length (4 bytes, big-endian) | header (JSON) | zstd frame (the body)

The header: `format`, `table`, `lsn`, `first_seq`, `last_seq`, `rows`, `columns` (names, in
the order of the row text), `key` (the key columns), `key_kinds` (how each key value was
archived: `long`, `string`, `uuid`, `numeric`), `min_commit_ts_us`, `max_commit_ts_us`,
`tier`, `wedding_ids` (sorted) or `wedding_bloom` (`archive.bloom` text, above
`segment.MAX_WEDDING_IDS`), `codec` (`zstd`), `body_bytes` (the body's size decompressed; absent
from parts written before it existed).

The body holds one line per row, in seq order, no seq twice:

    <seq> TAB <wedding id or \\N> TAB <key text> TAB <the row's columns in COPY text format>

`<key text>` is the key columns' Postgres text joined by U+001F, COPY-escaped: what replay
matches changed keys against without parsing the row. A part is written only when every key
value is of a kind listed above (whose canonical key form the text gives back exactly);
otherwise the sink writes a change segment, as for any other records.

Reading checks the header against the body: seq order and range, row count, weddings, and
the body's size: it is decompressed in bounded chunks and may produce exactly `body_bytes`
(without it, at most `rows` times `bounded.MAX_ROW_TEXT_BYTES`), so a corrupt or hostile body
cannot expand without bound (`archive.bounded`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

from replicator.archive.bloom import Bloom, may_hold
from replicator.archive.bounded import MAX_ROW_TEXT_BYTES, legacy_limit, zstd_chunks
from replicator.archive.render import copy_escape, copy_line, text
from replicator.errors import ReplicatorError
from replicator.position import Lsn
from replicator.transport.avro import NUMERIC, UUID_

__all__ = [
    "KEY_SEPARATOR",
    "PartCorrupt",
    "PartHeader",
    "decode_part",
    "encode_part",
    "key_values",
    "partable",
    "pg_key_text",
]

MAGIC: Final = b"WSP1"
FORMAT: Final = 1
KEY_SEPARATOR: Final = "\x1f"
MAX_WEDDING_IDS: Final = 1000
_UNESCAPE: Final = re.compile(r"\\(.)")
_UNESCAPED: Final = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\", "b": "\b", "f": "\f",
                     "v": "\v"}


class PartCorrupt(ReplicatorError, ValueError):
    """A part whose content does not match its header, or is not a part."""


@dataclass(frozen=True, slots=True)
class PartHeader:
    table: str
    lsn: Lsn
    first_seq: int
    last_seq: int
    rows: int
    columns: tuple[str, ...]
    key: tuple[str, ...]
    key_kinds: tuple[str, ...]
    min_commit_ts_us: int
    max_commit_ts_us: int
    tier: str
    wedding_ids: tuple[str, ...] | None
    wedding_bloom: str | None
    body_bytes: int | None = None  # the body decompressed; None in older parts

    def may_hold_wedding(self, wedding_id: str) -> bool:
        return may_hold(wedding_id, self.wedding_ids, self.wedding_bloom)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"format": FORMAT, "table": self.table, "lsn": int(self.lsn),
               "first_seq": self.first_seq, "last_seq": self.last_seq, "rows": self.rows,
               "columns": list(self.columns), "key": list(self.key),
               "key_kinds": list(self.key_kinds), "min_commit_ts_us": self.min_commit_ts_us,
               "max_commit_ts_us": self.max_commit_ts_us, "tier": self.tier,
               "wedding_ids": None if self.wedding_ids is None else list(self.wedding_ids),
               "wedding_bloom": self.wedding_bloom, "codec": "zstd"}
        if self.body_bytes is not None:
            doc["body_bytes"] = self.body_bytes
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PartHeader:
        try:
            doc = json.loads(raw)
            if doc["format"] > FORMAT:
                raise PartCorrupt(f"part format {doc['format']} is newer than this replicator "
                                  f"reads ({FORMAT}): upgrade it")
            ids = doc["wedding_ids"]
            return cls(doc["table"], Lsn(doc["lsn"]), int(doc["first_seq"]),
                       int(doc["last_seq"]), int(doc["rows"]), tuple(doc["columns"]),
                       tuple(doc["key"]), tuple(doc["key_kinds"]),
                       int(doc["min_commit_ts_us"]), int(doc["max_commit_ts_us"]),
                       str(doc["tier"]), None if ids is None else tuple(ids),
                       doc["wedding_bloom"], _size(doc.get("body_bytes")))
        except (ValueError, KeyError, TypeError) as exc:
            raise PartCorrupt(f"the part's header is not valid: {type(exc).__name__}") from None


def _size(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError("a size must be a whole number of bytes")
    return value


# --- keys ------------------------------------------------------------------------------------


def _key_kind(value: Any) -> str | None:
    cls = type(value)
    if cls is int:
        return "long"
    if cls is str:
        return "string"
    if cls is tuple and value[0] == UUID_:
        return "uuid"
    if cls is tuple and value[0] == NUMERIC:
        return "numeric"
    return None


def partable(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether *records* (envelope datums of one table) can be a part: all snapshot rows at
    one LSN, with key values of the kinds a part can give back exactly."""
    if not records:
        return False
    lsn = records[0]["source"]["lsn"]
    for record in records:
        if record["op"] != "r" or record["source"]["lsn"] != lsn or record["after"] is None:
            return False
        if not record["key"] or any(_key_kind(v) is None for v in record["key"].values()):
            return False
    return True


def pg_key_text(key: Mapping[str, Any]) -> str:
    """A row's key as a part line holds it (before COPY escaping)."""
    if len(key) == 1:  # the common case, once per change read: kept short
        for value in key.values():
            cls = type(value)
            if cls is str:
                return str(value)
            if cls is int:
                return str(value)
            return str(text(value))
    return KEY_SEPARATOR.join(str(text(v)) for v in key.values())


def key_values(texts: Sequence[str], kinds: Sequence[str], names: Sequence[str]
               ) -> dict[str, Any]:
    """The key columns as the Python values a change event's key holds."""
    out: dict[str, Any] = {}
    for name, kind, value in zip(names, kinds, texts, strict=True):
        if kind == "long":
            out[name] = int(value)
        elif kind == "uuid":
            out[name] = UUID(value)
        elif kind == "numeric":
            out[name] = Decimal(value)
        else:
            out[name] = value
    return out


# --- encoding and decoding -------------------------------------------------------------------


def encode_part(records: Sequence[Mapping[str, Any]], *, table: str, tier: str,
                level: int = 3) -> tuple[bytes, PartHeader]:
    """A part of *records* (`partable`), ordered by seq, each seq once."""
    from backports import zstd

    if not partable(records):
        raise ValueError("a part holds snapshot rows of one LSN with simple keys only")
    by_seq: dict[int, Mapping[str, Any]] = {}
    for record in records:
        by_seq.setdefault(record["source"]["seq"], record)
    ordered = [by_seq[s] for s in sorted(by_seq)]
    first = ordered[0]
    columns = tuple(first["after"])
    key = tuple(first["key"])
    kinds = tuple(str(_key_kind(v)) for v in first["key"].values())
    lines = []
    weddings: set[str] = set()
    low = high = first["source"]["ts_us"]
    for record in ordered:
        after, source, wedding = record["after"], record["source"], record["wedding_id"]
        if tuple(after) != columns:
            raise ValueError(f"snapshot rows of {table} at one LSN have different columns")
        if wedding is not None:
            weddings.add(wedding)
        ts = source["ts_us"]
        low, high = min(low, ts), max(high, ts)
        lines.append(f"{source['seq']}\t"
                     + ("\\N" if wedding is None else copy_escape(wedding))
                     + "\t" + copy_escape(pg_key_text(record["key"])) + "\t"
                     + copy_line([after[c] for c in columns]))
    ids: tuple[str, ...] | None = tuple(sorted(weddings))
    bloom = None
    if ids is not None and len(ids) > MAX_WEDDING_IDS:
        bloom, ids = Bloom.of(ids).to_text(), None
    text_ = "".join(lines).encode()
    header = PartHeader(table, Lsn(first["source"]["lsn"]), ordered[0]["source"]["seq"],
                        ordered[-1]["source"]["seq"], len(ordered), columns, key, kinds, low,
                        high, tier, ids, bloom, len(text_))
    raw = header.to_json()
    body = zstd.compress(text_, level)
    return MAGIC + struct.pack(">I", len(raw)) + raw + body, header


def framed_header(data: bytes, magic: bytes, what: str) -> tuple[bytes, int]:
    """The JSON header of `magic | length (4 bytes, big-endian) | header | ...`, and where
    what follows it starts."""
    if data[:4] != magic or len(data) < 8:
        raise PartCorrupt(f"not a {what} (no {magic.decode()} magic)")
    (size,) = struct.unpack(">I", data[4:8])
    if len(data) < 8 + size:
        raise PartCorrupt(f"the {what} ends inside its header")
    return data[8:8 + size], 8 + size


def read_part_header(data: bytes) -> tuple[PartHeader, int]:
    raw, start = framed_header(data, MAGIC, "snapshot part")
    return PartHeader.from_json(raw), start


def decode_part(data: bytes) -> tuple[PartHeader, Iterator[list[str]]]:
    """The header, and the body's lines in batches (each line without its newline). The
    batches are checked as they stream: seq order and range, rows, weddings; a mismatch
    raises `PartCorrupt` (act on a part once its iterator is exhausted)."""
    header, start = read_part_header(data)

    def batches() -> Iterator[list[str]]:
        exact = header.body_bytes is not None
        limit = header.body_bytes if header.body_bytes is not None else legacy_limit(header.rows)
        chunks = zstd_chunks(memoryview(data)[start:], limit, "the part's body", PartCorrupt,
                             exact=exact)
        pending: list[bytes] = []  # the start of a line that continues in the next chunk
        held = 0
        rows, last, first = 0, -1, -1
        weddings: set[str] = set()
        try:
            for chunk in chunks:
                end = chunk.rfind(b"\n")
                if end < 0:
                    pending.append(chunk)
                    held += len(chunk)
                    if held > MAX_ROW_TEXT_BYTES:
                        raise PartCorrupt("the part's body holds a line longer than any row")
                    continue
                # Complete lines only are decoded: a chunk may end inside a character.
                lines = b"".join((*pending, chunk[:end])).decode().split("\n")
                pending, held = [chunk[end + 1:]], len(chunk) - end - 1
                for line in lines:
                    seq_text, wedding, _ = line.split("\t", 2)
                    seq = int(seq_text)
                    if seq <= last:
                        raise PartCorrupt(f"seq {seq} follows {last}")
                    if first < 0:
                        first = seq
                    last = seq
                    if wedding != "\\N":
                        weddings.add(wedding)
                rows += len(lines)
                yield lines
        except (UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, PartCorrupt):
                raise
            raise PartCorrupt(f"the part's body is not readable: {type(exc).__name__}") from None
        if held:
            raise PartCorrupt("the part's body is cut short")
        if rows != header.rows or (header.first_seq, header.last_seq) != (first, last):
            raise PartCorrupt(f"the part holds {rows} rows up to seq {last}, its header says "
                              f"{header.rows} rows, seq {header.first_seq}-{header.last_seq}")
        ids = header.wedding_ids
        if ids is not None and tuple(sorted(weddings)) != ids:
            raise PartCorrupt("the part's weddings do not match its header")
        if header.wedding_bloom is not None:
            bloom = Bloom.from_text(header.wedding_bloom)
            if any(w not in bloom for w in weddings):
                raise PartCorrupt("the part's weddings do not match its header")

    return header, batches()


def split_line(line: str) -> tuple[int, str | None, str, str]:
    """`(seq, wedding, key text, row text)` of a body line (key and wedding unescaped, the row
    still COPY text)."""
    seq, wedding, key, row = line.split("\t", 3)
    return (int(seq), None if wedding == "\\N" else unescape(wedding), unescape(key), row)


def unescape(field: str) -> str:
    if "\\" not in field:
        return field
    return _UNESCAPE.sub(lambda m: _UNESCAPED.get(m[1], m[1]), field)


def row_fields(row: str) -> list[str | None]:
    """The columns of a COPY text row, unescaped (`None` for NULL)."""
    return [None if f == "\\N" else unescape(f) for f in row.split("\t")]
