"""AES-256-GCM envelope encryption of every stored object.

Each object gets a fresh random 256-bit data key. The data key is wrapped by a named
key-encryption key (KEK) from the `Keyring`, and the wrapped key travels in the object's own
header, so rotating the active KEK never rewrites old objects: they name the KEK that wrote
them and decrypt as long as the keyring still holds it.

Object format, version 1 (all integers big-endian)::

    "WSE1"            4   magic
    version           1   1
    flags             1   0 (reserved)
    n                 1   length of the KEK name, 1..64
    KEK name          n   ASCII
    KEK check         8   HMAC-SHA256(KEK, "wedsync-replicator kek check v1")[:8]
    chunk size        4   plaintext bytes per chunk
    length            8   plaintext length; 2**64-1 when the writer streamed without knowing it
    nonce prefix      8   random, per object
    name digest      32   SHA-256 of the object's name (the associated data)
    wrap nonce       12   random
    wrapped key      48   AES-256-GCM(KEK, data key), AAD = every header byte before "wrap nonce"
    header digest    32   SHA-256 of every header byte before it
    chunks ...            AES-256-GCM(data key) of each chunk, ciphertext + 16-byte tag

Every chunk holds `chunk size` plaintext bytes except the final one (0..chunk size bytes; an
empty object is one empty final chunk). Its nonce is the object's nonce prefix followed by the
chunk index (32 bits), and its associated data is (name digest, header digest, 64-bit chunk
index, final flag). So any changed byte, a chunk moved, dropped or borrowed from another object,
and a header swapped in from another object fail authentication.

The data key is wrapped with AES-256-GCM rather than AES-KW (RFC 3394) because GCM binds the
header as associated data, so the KEK name, chunk size, length and object name cannot be
altered without the unwrap failing. Each wrap uses a random 96-bit nonce: keep one KEK for
fewer than 2**32 objects (rotate long before; yearly rotation is far below that).

Failures are distinct exceptions, each naming the object and, where it matters, the KEK name
(never a key's bytes)::

    CryptoError
     ├── KeyringError         the keyring cannot be loaded or changed as asked
     ├── UnknownKey           the object names a KEK that the keyring does not hold
     ├── WrongKey             the keyring's KEK of that name is not the one that wrote the object
     ├── NotEncrypted         the bytes do not start with the WSE1 magic
     ├── UnsupportedVersion   a format version (or flag) this code does not read
     ├── ObjectNameMismatch   the object was written under another name (objects swapped)
     ├── ObjectTampered       authentication failed: bytes changed, chunks reordered or mixed
     └── ObjectTruncated      the object ends early: its final chunk, or part of one, is missing

Decryption checks, in this order: the unkeyed header digest (so a corrupted header is reported
as such, not as a wrong key), the key name, the KEK check value (an HMAC, which reveals nothing
of the key), the object name, then the GCM tags, which are what actually protect the object.
When the writer streamed without declaring the length, a cut exactly at a chunk boundary is
still `ObjectTruncated` (the last chunk left authenticates only as a non-final one), but a cut
inside a chunk cannot be told from a modified chunk and is `ObjectTampered`. `encrypt()` always
records the length, and so always reports a cut as `ObjectTruncated`.

Memory: `encrypt_stream` and `decrypt_stream` each hold a few chunks (1 MiB by default) plus
the input piece being consumed, whatever the object size: a 50 MiB object piped through both
peaks at about 6 MiB. `encrypt()` and `decrypt()` hold the whole object, by design.

Object names: pass the object's key relative to the namespace (`segments/public.guests/...`),
so that a copy in another store or under another root still decrypts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from replicator.errors import OperatorError, ReplicatorError

__all__ = [
    "DEFAULT_CHUNK_SIZE", "CryptoError", "EncryptedHeader", "Keyring", "KeyringError",
    "NotEncrypted", "ObjectNameMismatch", "ObjectTampered", "ObjectTruncated", "UnknownKey",
    "UnsupportedVersion", "WrongKey", "decrypt", "decrypt_stream", "encrypt", "encrypt_stream",
    "generate_key", "read_header",
]

MAGIC: Final = b"WSE1"
VERSION: Final = 1
KEY_SIZE: Final = 32
DEFAULT_CHUNK_SIZE: Final = 1 << 20
MAX_CHUNK_SIZE: Final = 64 << 20
ENV_PREFIX: Final = "REPLICATOR_KEK_"
ENV_ACTIVE: Final = "REPLICATOR_KEK_ACTIVE"

_TAG: Final = 16
_UNKNOWN_LENGTH: Final = 2**64 - 1
_MAX_CHUNKS: Final = 2**32  # the chunk index is 32 bits of the nonce
_KEY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CHECK_LABEL: Final = b"wedsync-replicator kek check v1"
_NAME_LABEL: Final = b"wedsync-replicator object name v1\x00"
_FIXED: Final = struct.Struct(">4sBBB")  # magic, version, flags, name length
_MIDDLE: Final = struct.Struct(">8sIQ8s32s")  # check, chunk size, length, prefix, name digest
_WRAP_NONCE, _WRAPPED, _DIGEST = 12, KEY_SIZE + _TAG, 32


class CryptoError(ReplicatorError):
    """An object cannot be encrypted or decrypted; the message names the object."""


class KeyringError(CryptoError, OperatorError):
    """The keyring cannot be loaded or changed as asked (a configuration error)."""


class UnknownKey(CryptoError, OperatorError):
    def __init__(self, message: str, *, key_name: str) -> None:
        super().__init__(message)
        self.key_name = key_name


class WrongKey(CryptoError):
    def __init__(self, message: str, *, key_name: str) -> None:
        super().__init__(message)
        self.key_name = key_name


class NotEncrypted(CryptoError):
    pass


class UnsupportedVersion(CryptoError):
    pass


class ObjectNameMismatch(CryptoError):
    pass


class ObjectTampered(CryptoError):
    pass


class ObjectTruncated(CryptoError):
    pass


def generate_key() -> bytes:
    """A new random 256-bit KEK (store it base64-encoded, e.g. `openssl rand -base64 32`)."""
    return secrets.token_bytes(KEY_SIZE)


def _key_check(kek: bytes) -> bytes:
    return hmac.digest(kek, _CHECK_LABEL, "sha256")[:8]


def _name_digest(name: str) -> bytes:
    return hashlib.sha256(_NAME_LABEL + name.encode("utf-8")).digest()


# --- the keyring -----------------------------------------------------------------------------


class Keyring:
    """Named key-encryption keys, one of them active (used for new objects).

    Unless named explicitly, the active key is the highest name in sort order (plain string
    order), so names that sort by age (`2025-01`, `2025-07`, or `K0001`, `K0002`) make the
    newest key active without further configuration. Keys are never shown: the repr lists
    names only, and no error message quotes a key.
    """

    __slots__ = ("_active", "_checks", "_keys")

    def __init__(self, keys: Mapping[str, bytes], *, active: str | None = None) -> None:
        if not keys:
            raise KeyringError("the keyring holds no key-encryption keys")
        for name, key in keys.items():
            if not isinstance(name, str) or _KEY_NAME.fullmatch(name) is None:
                raise KeyringError(
                    f"invalid key name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
                    "starting with a letter or digit"
                )
            if not isinstance(key, bytes) or len(key) != KEY_SIZE:
                size = len(key) if isinstance(key, bytes) else type(key).__name__
                raise KeyringError(f"key {name} must be {KEY_SIZE} bytes, got {size}")
        self._keys: dict[str, bytes] = dict(keys)
        self._checks = {name: _key_check(key) for name, key in self._keys.items()}
        chosen = max(self._keys) if active is None else active
        if chosen not in self._keys:
            raise KeyringError(
                f"the active key {chosen} is not in the keyring (it holds {self._names()})"
            )
        self._active = chosen

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring:
        """Keys from `REPLICATOR_KEK_<NAME>=<base64 of 32 bytes>`; `REPLICATOR_KEK_ACTIVE=<NAME>`
        picks the active one (default: the highest name). *environ* defaults to `os.environ`.
        """
        env = os.environ if environ is None else environ
        keys: dict[str, bytes] = {}
        for variable, value in env.items():
            if variable.startswith(ENV_PREFIX) and variable != ENV_ACTIVE:
                keys[variable.removeprefix(ENV_PREFIX)] = _decode_key(value, variable)
        if not keys:
            raise KeyringError(
                f"no key-encryption keys in the environment: set {ENV_PREFIX}<NAME> to the "
                "base64 of 32 random bytes (openssl rand -base64 32)"
            )
        active = env.get(ENV_ACTIVE) or None
        if active is not None and active not in keys:
            raise KeyringError(f"{ENV_ACTIVE} names {active}, but {ENV_PREFIX}{active} is not set")
        return cls(keys, active=active)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, active: str | None = None,
        check_permissions: bool = True,
    ) -> Keyring:
        """Keys from a file of `name base64` lines (blank lines and `#` comments allowed).

        With *check_permissions* (the default) a file that group or others can read or write
        is refused, as ssh does with private keys.
        """
        file = Path(path)
        try:
            mode = file.stat().st_mode
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(f"cannot read key file {file}: {exc.strerror}") from None
        if check_permissions and stat.S_IMODE(mode) & 0o077:
            raise KeyringError(
                f"key file {file} is accessible to group or others (mode "
                f"{stat.S_IMODE(mode):04o}): chmod 600 it, or disable the permission check"
            )
        keys: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{file} line {number}"
            if len(fields) != 2:
                raise KeyringError(f"{where}: expected 'name base64', got {len(fields)} fields")
            name = fields[0]
            if name in keys:
                raise KeyringError(f"{where}: key {name} appears twice")
            keys[name] = _decode_key(fields[1], f"key {name} ({where})")
        if not keys:
            raise KeyringError(f"key file {file} holds no keys")
        return cls(keys, active=active)

    @property
    def active(self) -> str:
        """The name of the key that encrypts new objects."""
        return self._active

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def with_active(self, name: str) -> Keyring:
        """The same keys with *name* active: how a rotation starts using a new key."""
        return Keyring(self._keys, active=name)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __repr__(self) -> str:
        return f"Keyring(active={self._active!r}, keys={list(self.names)!r})"

    __str__ = __repr__

    def _names(self) -> str:
        return ", ".join(self.names)

    def _kek(self, name: str, object_name: str) -> tuple[bytes, bytes]:
        key = self._keys.get(name)
        if key is None:
            raise UnknownKey(
                f"object '{object_name}' was encrypted with key {name}, which the keyring does "
                f"not hold (it holds {self._names()}): add key {name} to the keyring "
                f"({ENV_PREFIX}{name} or the key file)",
                key_name=name,
            )
        return key, self._checks[name]


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where} is not valid base64") from None
    if len(key) != KEY_SIZE:
        raise KeyringError(f"{where} must decode to {KEY_SIZE} bytes, got {len(key)}")
    return key


# --- the header ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncryptedHeader:
    """What an encrypted object's header says (none of it secret)."""

    key_name: str
    chunk_size: int
    length: int | None  # plaintext bytes, when the writer declared them
    size: int  # bytes of the header itself
    key_check: bytes
    nonce_prefix: bytes
    name_digest: bytes
    wrap_nonce: bytes
    wrapped_key: bytes
    digest: bytes
    wrap_aad: bytes  # the header bytes bound to the wrapped key


def _build_header(kek_name: str, kek: bytes, check: bytes, data_key: bytes, *, name: str,
                  chunk_size: int, length: int | None) -> tuple[bytes, bytes, bytes, bytes]:
    """(header bytes, nonce prefix, name digest, header digest)."""
    encoded_name = kek_name.encode("ascii")
    prefix, name_digest = secrets.token_bytes(8), _name_digest(name)
    aad = (
        _FIXED.pack(MAGIC, VERSION, 0, len(encoded_name)) + encoded_name
        + _MIDDLE.pack(check, chunk_size, _UNKNOWN_LENGTH if length is None else length,
                       prefix, name_digest)
    )
    wrap_nonce = secrets.token_bytes(_WRAP_NONCE)
    body = aad + wrap_nonce + AESGCM(kek).encrypt(wrap_nonce, data_key, aad)
    digest = hashlib.sha256(body).digest()
    return body + digest, prefix, name_digest, digest


def _parse_header(raw: bytes, name: str) -> EncryptedHeader:
    """*raw* is the whole header (see `_header_size`)."""
    name_length = raw[6]
    middle = 7 + name_length
    wrap = middle + _MIDDLE.size
    body_end = wrap + _WRAP_NONCE + _WRAPPED
    digest = raw[body_end:]
    if not hmac.compare_digest(hashlib.sha256(raw[:body_end]).digest(), digest):
        raise ObjectTampered(f"the header of object '{name}' is corrupt (digest mismatch)")
    if raw[5] != 0:
        raise UnsupportedVersion(f"object '{name}' uses format flags {raw[5]:#x} that this "
                                 "version does not know; upgrade the replicator")
    try:
        key_name = raw[7:middle].decode("ascii")
    except UnicodeDecodeError:
        key_name = ""
    check, chunk_size, length, prefix, name_digest = _MIDDLE.unpack_from(raw, middle)
    if _KEY_NAME.fullmatch(key_name) is None or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ObjectTampered(f"the header of object '{name}' is not valid")
    return EncryptedHeader(
        key_name=key_name, chunk_size=chunk_size,
        length=None if length == _UNKNOWN_LENGTH else length, size=len(raw),
        key_check=check, nonce_prefix=prefix, name_digest=name_digest,
        wrap_nonce=raw[wrap:wrap + _WRAP_NONCE], wrapped_key=raw[wrap + _WRAP_NONCE:body_end],
        digest=digest, wrap_aad=raw[:wrap],
    )


def _header_size(fixed: bytes, name: str) -> int:
    """Checks the first 7 bytes and returns the size of the whole header."""
    if not MAGIC.startswith(fixed[:len(MAGIC)]):
        raise NotEncrypted(f"object '{name}' is not an encrypted object (no {MAGIC.decode()} "
                           "magic): it was stored unencrypted or is something else")
    if len(fixed) < _FIXED.size:
        raise ObjectTruncated(f"object '{name}' ends inside its header ({len(fixed)} bytes)")
    version, name_length = fixed[4], fixed[6]
    if version != VERSION:
        raise UnsupportedVersion(f"object '{name}' uses encryption format version {version}; "
                                 f"this replicator reads version {VERSION}: upgrade it")
    if not 1 <= name_length <= 64:
        raise ObjectTampered(f"the header of object '{name}' is not valid")
    return _FIXED.size + name_length + _MIDDLE.size + _WRAP_NONCE + _WRAPPED + _DIGEST


def read_header(data_prefix: bytes, name: str = "?") -> EncryptedHeader:
    """The header of an encrypted object from the first bytes of it (e.g. to find which KEK
    wrote it); the header is at most 223 bytes. Checks the header digest, not the key."""
    fixed = bytes(data_prefix[:_FIXED.size])
    size = _header_size(fixed, name)
    if len(data_prefix) < size:
        raise ObjectTruncated(f"object '{name}' ends inside its header ({len(data_prefix)} of "
                              f"{size} bytes)")
    return _parse_header(bytes(data_prefix[:size]), name)


def _open(header: EncryptedHeader, name: str, keyring: Keyring) -> AESGCM:
    """The data key's cipher, after checking key name, key and object name."""
    kek, check = keyring._kek(header.key_name, name)
    if not hmac.compare_digest(check, header.key_check):
        raise WrongKey(
            f"object '{name}' was encrypted with another key also named {header.key_name}: the "
            f"keyring's {header.key_name} does not match it (key check value differs); restore "
            f"the original {header.key_name}",
            key_name=header.key_name,
        )
    if not hmac.compare_digest(header.name_digest, _name_digest(name)):
        raise ObjectNameMismatch(f"object '{name}' was encrypted under another name: it was "
                                 "copied, renamed or swapped with another object")
    try:
        data_key = AESGCM(kek).decrypt(header.wrap_nonce, header.wrapped_key, header.wrap_aad)
    except InvalidTag:
        raise ObjectTampered(f"the wrapped data key of object '{name}' failed authentication: "
                             "its header was modified") from None
    return AESGCM(data_key)


def _chunk_aad(name_digest: bytes, header_digest: bytes, index: int, final: bool) -> bytes:
    return name_digest + header_digest + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


# --- streaming -------------------------------------------------------------------------------


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """Cut *pieces* into chunks of *size* bytes, flagging the last (0..size bytes) as final.

    A full chunk is held back until more input shows it is not the last one.
    """
    held = bytearray()
    for piece in pieces:
        view = memoryview(piece).cast("B")
        start, end = 0, len(view)
        while start < end:
            if len(held) == size:
                yield bytes(held), False
                held.clear()
            take = min(size - len(held), end - start)
            held += view[start:start + take]
            start += take
    yield bytes(held), True


def encrypt_stream(
    chunks: Iterable[bytes], *, name: str, keyring: Keyring,
    chunk_size: int = DEFAULT_CHUNK_SIZE, length: int | None = None,
) -> Iterator[bytes]:
    """Encrypt the bytes of *chunks* (pieces of any size) as object *name* with the active key.

    Yields the header, then one encrypted chunk at a time. Declaring *length* (the total
    plaintext bytes) lets decryption tell any cut from a modification; input of another length
    raises `ValueError` before the final chunk is produced.
    """
    if not name:
        raise ValueError("an encrypted object needs a name")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    if length is not None and not 0 <= length < _UNKNOWN_LENGTH:
        raise ValueError(f"length must be 0..2**64-2, got {length}")
    kek_name = keyring.active
    kek, check = keyring._kek(kek_name, name)
    return _encrypt(chunks, name, kek_name, kek, check, chunk_size, length)


def _encrypt(pieces: Iterable[bytes], name: str, kek_name: str, kek: bytes, check: bytes,
             chunk_size: int, length: int | None) -> Iterator[bytes]:
    data_key = AESGCM.generate_key(bit_length=256)
    header, prefix, name_digest, digest = _build_header(
        kek_name, kek, check, data_key, name=name, chunk_size=chunk_size, length=length)
    cipher = AESGCM(data_key)
    del data_key
    yield header
    total = 0
    for index, (plain, final) in enumerate(_rechunk(pieces, chunk_size)):
        if index >= _MAX_CHUNKS:
            raise ValueError(f"object '{name}' needs more than 2**32 chunks: use larger chunks")
        total += len(plain)
        if length is not None and (total > length or (final and total != length)):
            actual = "longer" if total > length else f"{total} bytes"
            raise ValueError(f"object '{name}' was declared as {length} bytes but is {actual}")
        nonce = prefix + index.to_bytes(4, "big")
        yield cipher.encrypt(nonce, plain, _chunk_aad(name_digest, digest, index, final))


class _Reader:
    """Exact-size reads over an iterator of byte pieces, holding little more than one read."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = iter(pieces)
        self._buffer = bytearray()
        self._start = 0  # bytes of the buffer already read
        self._eof = False

    def _fill(self, size: int) -> None:
        while len(self._buffer) - self._start < size and not self._eof:
            piece = next(self._pieces, None)
            if piece is None:
                self._eof = True
                break
            if self._start:  # compact before growing: memory stays one read plus one piece
                del self._buffer[:self._start]
                self._start = 0
            self._buffer += piece

    def read(self, size: int) -> bytes:
        """*size* bytes, or fewer at the end of the stream."""
        self._fill(size)
        end = min(self._start + size, len(self._buffer))
        with memoryview(self._buffer) as view:
            out = bytes(view[self._start:end])
        self._start = end
        return out

    def at_end(self) -> bool:
        self._fill(1)
        return self._start == len(self._buffer)


def decrypt_stream(chunks: Iterable[bytes], *, name: str, keyring: Keyring) -> Iterator[bytes]:
    """Decrypt object *name* from the pieces of its bytes (any sizes), one chunk at a time.

    The header is checked before the first yield. Every yielded chunk is authenticated, but
    only the end of the iteration proves the object complete: act on the plaintext once the
    iterator is exhausted without an error (or buffer it, as `decrypt()` does).
    """
    reader = _Reader(chunks)
    fixed = reader.read(_FIXED.size)
    size = _header_size(fixed, name)
    raw = fixed + reader.read(size - len(fixed))
    if len(raw) < size:
        raise ObjectTruncated(f"object '{name}' ends inside its header ({len(raw)} of {size} "
                              "bytes)")
    header = _parse_header(raw, name)
    cipher = _open(header, name, keyring)
    return _decrypt(reader, header, cipher, name)


def _decrypt(reader: _Reader, header: EncryptedHeader, cipher: AESGCM, name: str
             ) -> Iterator[bytes]:
    step = header.chunk_size + _TAG

    def open_chunk(data: bytes, index: int, final: bool) -> bytes:
        nonce = header.nonce_prefix + index.to_bytes(4, "big")
        aad = _chunk_aad(header.name_digest, header.digest, index, final)
        return cipher.decrypt(nonce, data, aad)

    def tampered(index: int, why: str = "") -> ObjectTampered:
        return ObjectTampered(f"chunk {index} of object '{name}' failed authentication: it was "
                              f"modified, reordered or taken from another object{why}")

    if header.length is not None:
        count = max(1, -(-header.length // header.chunk_size))
        for index in range(count):
            final = index == count - 1
            expected = (header.length - index * header.chunk_size if final
                        else header.chunk_size) + _TAG
            data = reader.read(expected)
            if len(data) < expected:
                raise ObjectTruncated(f"object '{name}' is cut short inside chunk {index} of "
                                      f"{count}")
            try:
                yield open_chunk(data, index, final)
            except InvalidTag:
                raise tampered(index) from None
        if not reader.at_end():
            raise ObjectTampered(f"object '{name}' has bytes after its final chunk")
        return

    index = 0
    while True:
        data = reader.read(step)
        if len(data) == step and not reader.at_end():
            try:
                yield open_chunk(data, index, False)
            except InvalidTag:
                raise tampered(index) from None
            index += 1
            continue
        if len(data) < _TAG:
            raise ObjectTruncated(f"object '{name}' is cut short: chunk {index} is incomplete")
        try:
            plain = open_chunk(data, index, True)
        except InvalidTag:
            if len(data) == step and _opens(open_chunk, data, index):
                raise ObjectTruncated(f"object '{name}' is cut short: chunk {index} is not the "
                                      "final one and nothing follows it") from None
            raise tampered(index, ", or cut short inside it") from None
        yield plain
        return


def _opens(open_chunk: Callable[[bytes, int, bool], bytes], data: bytes, index: int) -> bool:
    """Whether *data* authenticates as a non-final chunk (the cut-at-a-boundary case)."""
    try:
        open_chunk(data, index, False)
    except InvalidTag:
        return False
    return True


def encrypt(data: bytes, name: str, keyring: Keyring, *,
            chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """The encrypted object for *data*, with its length recorded."""
    return b"".join(encrypt_stream((data,), name=name, keyring=keyring, chunk_size=chunk_size,
                                   length=len(data)))


def decrypt(data: bytes, name: str, keyring: Keyring) -> bytes:
    """The plaintext of the encrypted object *data* stored as *name*."""
    return b"".join(decrypt_stream((data,), name=name, keyring=keyring))
