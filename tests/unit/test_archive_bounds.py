"""Decompression in the archive is bounded by what the object's header says: a zstd bomb (a
frame of a few kilobytes that expands to a gigabyte) in a snapshot part, a compaction snapshot
part or a segment fails at once, in bounded memory, with the format's corrupt error; objects
that are what their headers say still read."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import pytest
from backports import zstd
from fastavro import schemaless_reader, schemaless_writer

from replicator.archive import part as part_format
from replicator.archive import snapshot as snapshot_format
from replicator.archive.bounded import MAX_BLOCK_BYTES, MAX_ROW_TEXT_BYTES, zstd_chunks
from replicator.archive.part import PartCorrupt, PartHeader, decode_part
from replicator.archive.segment import (
    _OCF_HEADER,
    SegmentCorrupt,
    decode_transaction_segment,
    encode_transaction_segment,
    read_header,
)
from replicator.archive.snapshot import SnapshotHeader, SnapshotPart, SnapshotWriter
from replicator.events import TransactionRecord
from replicator.position import Lsn

GIB = 1 << 30
PEAK = 96 << 20  # what a failed read may hold at most, well under the bomb's size
#: ... when the header gives only a row count: one row's text at most (a line is held whole)
LEGACY_PEAK = MAX_ROW_TEXT_BYTES + (32 << 20)


def rle_bomb(size: int, byte: bytes = b"a") -> bytes:
    """One zstd frame that decompresses to *size* copies of *byte*: RLE blocks of 128 KiB,
    four bytes each (32 KiB for a gigabyte), with no content size in its header."""
    out = bytearray(struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x38]))  # window 128 KiB
    block, left = 128 << 10, size
    while left:
        n = min(block, left)
        left -= n
        out += ((n << 3) | (1 << 1) | (0 if left else 1)).to_bytes(3, "little") + byte
    return bytes(out)


def bounded(read: Callable[[], object], most: int = PEAK) -> BaseException:
    """The error *read* raises, having held at most *most* bytes at a time."""
    tracemalloc.start()
    try:
        with pytest.raises((PartCorrupt, SegmentCorrupt)) as info:
            read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < most, f"{peak} bytes held"
    return info.value


def test_the_bomb_is_what_it_says() -> None:
    frame = rle_bomb(300_000, b"\n")
    assert len(frame) < 20 and zstd.decompress(frame) == b"\n" * 300_000


def test_a_frame_may_not_produce_more_than_its_limit() -> None:
    chunks = zstd_chunks(rle_bomb(GIB), 1000, "the frame", PartCorrupt)
    error = bounded(lambda: list(chunks))
    assert "more than the 1000 bytes" in str(error)
    assert b"".join(zstd_chunks(zstd.compress(b"x" * 5000), 5000, "f", PartCorrupt,
                                exact=True)) == b"x" * 5000
    with pytest.raises(PartCorrupt, match="holds 5000 bytes, its header says 5001"):
        list(zstd_chunks(zstd.compress(b"x" * 5000), 5001, "f", PartCorrupt, exact=True))


# --- snapshot parts -----------------------------------------------------------------------


def part_bytes(body: bytes, *, rows: int, body_bytes: int | None) -> bytes:
    header = PartHeader("public.guests", Lsn(0x100), 1, rows, rows, ("id",), ("id",),
                        ("long",), 0, 0, "low", (), None, body_bytes=body_bytes)
    raw = header.to_json()
    return part_format.MAGIC + struct.pack(">I", len(raw)) + raw + body


def read_part(data: bytes) -> None:
    _, batches = decode_part(data)
    for _ in batches:
        pass


@pytest.mark.parametrize("body_bytes", [25, None])  # with the size in the header, and without
def test_a_part_bomb_fails_fast(body_bytes: int | None) -> None:
    error = bounded(lambda: read_part(part_bytes(rle_bomb(GIB, b"\t"), rows=1,
                                                 body_bytes=body_bytes)),
                    PEAK if body_bytes is not None else LEGACY_PEAK)
    assert "part" in str(error)


def test_a_part_whose_body_is_not_its_size_is_corrupt() -> None:
    body = b"1\t\\N\t1\t1\n"
    read_part(part_bytes(zstd.compress(body), rows=1, body_bytes=len(body)))
    with pytest.raises(PartCorrupt, match="header says 10"):
        read_part(part_bytes(zstd.compress(body), rows=1, body_bytes=len(body) + 1))


def test_a_written_part_carries_its_size_and_reads_back() -> None:
    records = [{"op": "r", "source": {"lsn": 0x100, "seq": seq, "ts_us": 5},
                "key": {"id": seq}, "after": {"id": seq, "name": "é" * 700_000},
                "wedding_id": None} for seq in (1, 2)]
    data, header = part_format.encode_part(records, table="public.guests", tier="low")
    assert header.body_bytes is not None and header.body_bytes > 2_800_000
    got, batches = decode_part(data)
    assert got == header and sum(len(b) for b in batches) == 2


# --- compaction snapshot parts ------------------------------------------------------------


def snapshot_bytes(frames: list[bytes], *, rows: int, sizes: tuple[int, int, int] | None
                   ) -> bytes:
    header = SnapshotHeader("public.guests", Lsn(0x100), 0, 1, rows, ("id",), ("id",),
                            ("long",), len(frames[0]), len(frames[1]), (), None,
                            frame_bytes=sizes)
    raw = header.to_json()
    return snapshot_format.MAGIC + struct.pack(">I", len(raw)) + raw + b"".join(frames)


@pytest.mark.parametrize("sizes", [(2, 2, 3), None])
@pytest.mark.parametrize("read", [SnapshotPart.row_chunks, SnapshotPart.row_bytes,
                                  SnapshotPart.key_lines, SnapshotPart.wedding_lines])
def test_a_snapshot_bomb_fails_fast(sizes: tuple[int, int, int] | None,
                                    read: Callable[[SnapshotPart], Iterator[bytes] | list[str]]
                                    ) -> None:
    frames = [rle_bomb(GIB, b"\n")] * 3
    part = SnapshotPart(snapshot_bytes(frames, rows=1, sizes=sizes))

    def consume() -> None:
        for _ in read(part):
            pass

    assert "snapshot part" in str(bounded(consume, PEAK if sizes else LEGACY_PEAK))


def test_a_written_snapshot_part_carries_its_frame_sizes() -> None:
    with SnapshotWriter(table="public.guests", lsn=Lsn(0x100), columns=("id", "name"),
                        key=("id",), key_kinds=("long",), parts=1) as writer:
        writer.add(["1\tana", "2\tbo"], ["1", "2"], ["7", "\\N"])
        [(_, data, header)] = list(writer.parts())
    assert header.frame_bytes == (len("1\tana\n2\tbo\n"), 4, 5)
    part = SnapshotPart(data)
    assert part.row_lines() == ["1\tana", "2\tbo"] and part.key_lines() == ["1", "2"]
    assert part.wedding_lines() == ["7", "\\N"]


# --- segments -----------------------------------------------------------------------------


def segment_with_block(codec: str, block: bytes, *, stamp: bool = True) -> bytes:
    """A one-record transaction segment whose only Avro block is replaced by *block*;
    without *stamp*, its header as segments wrote it before `wedsync.max_block_bytes`."""
    record = TransactionRecord(Lsn(0x100), Lsn(0x108), 1_000, 700, {"public.guests": 1},
                               origin=None)
    data, _ = encode_transaction_segment([record], codec=codec)
    stream = io.BytesIO(data)
    header = schemaless_reader(stream, _OCF_HEADER, None)
    start = stream.tell()
    sync = header["sync"]  # type: ignore[index]
    assert data.endswith(sync)
    if not stamp:
        header["meta"].pop("wedsync.max_block_bytes")  # type: ignore[index]
        out = io.BytesIO()
        schemaless_writer(out, _OCF_HEADER, header)
        return out.getvalue() + _long(1) + _long(len(block)) + block + sync
    return data[:start] + _long(1) + _long(len(block)) + block + sync


def _long(n: int) -> bytes:
    value, out = (n << 1) ^ (n >> 63), bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def read_segment(data: bytes) -> None:
    _, records = decode_transaction_segment(data)
    for _ in records:
        pass


def test_a_segment_bomb_fails_fast() -> None:
    data = segment_with_block("zstandard", rle_bomb(GIB))
    limit = read_header(data).max_block_bytes
    assert limit is not None and limit < 1000  # one small record
    error = bounded(lambda: read_segment(data))
    assert f"more than the {limit} bytes its header allows" in str(error)


def test_an_older_segment_bomb_fails_fast() -> None:
    """A segment without `wedsync.max_block_bytes`: a block is bounded by the hard cap."""
    data = segment_with_block("zstandard", rle_bomb(GIB), stamp=False)
    assert read_header(data).max_block_bytes is None
    error = bounded(lambda: read_segment(data), MAX_BLOCK_BYTES + (32 << 20))
    assert f"more than the {MAX_BLOCK_BYTES} bytes" in str(error)


def test_a_deflate_segment_bomb_fails_fast() -> None:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * (8 << 20)
    block = b"".join(squeeze.compress(chunk) for _ in range((MAX_BLOCK_BYTES >> 23) + 4))
    block += squeeze.flush()
    error = bounded(lambda: read_segment(segment_with_block("deflate", block)))
    assert "bytes its header allows" in str(error)


@pytest.mark.parametrize("codec", ["zstandard", "deflate"])
def test_segments_still_read(codec: str) -> None:
    records = [TransactionRecord(Lsn(lsn), Lsn(lsn + 8), 1_000, 700, {"public.guests": 1},
                                 origin=None) for lsn in range(0x100, 0x100 + 5000 * 16, 16)]
    data, header = encode_transaction_segment(records, codec=codec)
    _, read = decode_transaction_segment(data)
    assert len(list(read)) == header.rows == 5000
