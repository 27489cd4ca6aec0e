"""Bounded decompression: every zstd frame and Avro block of the archive is read with a
ceiling on what it may produce, so a corrupt or hostile object (a "zstd bomb": a few kilobytes
that expand to gigabytes) fails with its format's corrupt error instead of exhausting memory.

The ceilings come from the object's header: a snapshot part's `body_bytes`, a compaction
snapshot part's `frame_bytes` (rows, keys, weddings) are the exact decompressed sizes, which a
frame must produce exactly; a segment's `wedsync.max_block_bytes` is its largest Avro block
before compression, which no block may exceed. Objects written before those fields existed
are bounded by their row count times `MAX_ROW_TEXT_BYTES`, and each Avro block by
`MAX_BLOCK_BYTES`. Output comes in chunks of at most `CHUNK` bytes, so memory stays bounded
by what the caller keeps.

`MAX_RECORD_BYTES` (64 MiB) is the record size assumed for objects written before the sizes
were recorded: every archived record was then one Kafka message, and Kafka's limits are far
below it (1 MiB by default). A row as COPY text can take twice its binary size (bytea as hex,
escapes), hence `MAX_ROW_TEXT_BYTES`. `HARD_BLOCK_BYTES` caps a block whatever its header says.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["CHUNK", "HARD_BLOCK_BYTES", "MAX_BLOCK_BYTES", "MAX_RECORD_BYTES",
           "MAX_ROW_TEXT_BYTES", "BoundedBytes", "BoundedReader", "chunk_stream",
           "deflate_block", "legacy_limit", "zstd_block", "zstd_chunks"]

CHUNK: Final = 1 << 20
MAX_RECORD_BYTES: Final = 64 << 20
MAX_ROW_TEXT_BYTES: Final = 2 * MAX_RECORD_BYTES + 1024
#: An Avro block of a segment: `segment.BLOCK_SIZE` of records, plus the record that crossed
#: it (the writer closes a block once it reaches its size), with room to spare.
MAX_BLOCK_BYTES: Final = MAX_RECORD_BYTES + (2 << 20)
#: Whatever a segment's header says, no block decompresses to more (a Postgres value is at
#: most 1 GiB).
HARD_BLOCK_BYTES: Final = (2 << 30) + (2 << 20)


def legacy_limit(rows: int, per_row: int = MAX_ROW_TEXT_BYTES) -> int:
    """The ceiling of a frame whose header gives only its row count."""
    return max(0, rows) * per_row


def zstd_chunks(data: memoryview | bytes, limit: int, what: str,
                error: Callable[[str], Exception], *, exact: bool = False) -> Iterator[bytes]:
    """The decompressed chunks of the one zstd frame *data*, at most *limit* bytes in all
    (exactly *limit* when *exact*); *error(message)* is raised for a frame that is not
    readable, is cut short, has bytes after it, or produces more (or, *exact*, other) than
    *limit* bytes. *what* names the frame in messages."""
    from backports import zstd

    view = memoryview(data)
    decompressor = zstd.ZstdDecompressor()
    produced = 0
    pos = 0
    empty = memoryview(b"")
    try:
        while not decompressor.eof:
            piece = empty
            if decompressor.needs_input:
                if pos >= len(view):
                    break
                piece = view[pos:pos + CHUNK]
                pos += len(piece)
            room = min(CHUNK, limit - produced + 1)
            chunk = decompressor.decompress(piece, room)
            produced += len(chunk)
            if produced > limit:
                raise error(f"{what} decompresses to more than the {limit} bytes its header "
                            "allows")
            if chunk:
                yield chunk
    except zstd.ZstdError:
        raise error(f"{what} is not readable") from None
    if not decompressor.eof or decompressor.unused_data or pos < len(view):
        raise error(f"{what} is cut short or has trailing bytes")
    if exact and produced != limit:
        raise error(f"{what} holds {produced} bytes, its header says {limit}")


# --- Avro blocks: fastavro's block readers, bounded -------------------------------------------


def _block_data(fo: Any, error: Callable[[str], Exception]) -> tuple[bytes, int]:
    """A block's compressed bytes, read from *fo* after its record count, and the most it
    may decompress to: *fo*'s `block_limit` (`BoundedBytes`, `BoundedReader`), else
    `MAX_BLOCK_BYTES`."""
    if hasattr(fo, "read_bytes"):  # fastavro's pure-Python decoder wraps the file
        return bytes(fo.read_bytes()), MAX_BLOCK_BYTES
    shift = size = 0
    while True:
        byte = fo.read(1)
        if not byte or shift > 63:
            raise error("an Avro block's size is cut short or not a number")
        size |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    size = (size >> 1) ^ -(size & 1)
    data = fo.read(size) if size >= 0 else b""
    if size < 0 or len(data) != size:
        raise error("an Avro block is cut short")
    return data, int(getattr(fo, "block_limit", MAX_BLOCK_BYTES))


def zstd_block(fo: Any, *, error: Callable[[str], Exception]) -> io.BytesIO:
    """fastavro's `zstandard` block reader, bounded."""
    data, limit = _block_data(fo, error)
    out = io.BytesIO()
    for chunk in zstd_chunks(data, limit, "an Avro block", error):
        out.write(chunk)
    out.seek(0)
    return out


def deflate_block(fo: Any, *, error: Callable[[str], Exception]) -> io.BytesIO:
    """fastavro's `deflate` block reader, bounded."""
    data, limit = _block_data(fo, error)
    inflater = zlib.decompressobj(-15)
    try:
        out = inflater.decompress(data, limit + 1)
        if len(out) <= limit and not inflater.unconsumed_tail:
            out += inflater.flush()
    except zlib.error:
        raise error("an Avro block is not readable (deflate)") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise error(f"an Avro block decompresses to more than the {limit} bytes its header "
                    "allows")
    return io.BytesIO(out)


# --- files a segment is read from ---------------------------------------------------------


class _ChunkIO(io.RawIOBase):
    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk).cast("B")
        with memoryview(buffer) as target:
            size = min(len(target), len(self._pending))
            target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def chunk_stream(chunks: Iterable[bytes], buffer_size: int = 64 * 1024) -> IO[bytes]:
    """A readable binary file over an iterator of byte chunks, e.g. `crypto.decrypt_stream`,
    so that a segment decodes while it is being decrypted. Its `block_limit` bounds the
    Avro blocks read from it."""
    return BoundedReader(_ChunkIO(chunks), buffer_size)




class BoundedBytes(io.BytesIO):
    """A segment's bytes; `block_limit` caps what one of its blocks may decompress to."""

    block_limit: int = MAX_BLOCK_BYTES


class BoundedReader(io.BufferedReader):
    """`chunk_stream`'s file, with `block_limit` as `BoundedBytes`'s."""

    block_limit: int = MAX_BLOCK_BYTES
