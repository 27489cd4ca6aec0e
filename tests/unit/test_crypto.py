"""Envelope encryption: every object round-trips, and every way of damaging, cutting,
reordering, renaming or mis-keying an object fails with its own exception, naming the object
and never a key."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.crypto import (
    CryptoError,
    Keyring,
    KeyringError,
    NotEncrypted,
    ObjectNameMismatch,
    ObjectTampered,
    ObjectTruncated,
    UnknownKey,
    UnsupportedVersion,
    WrongKey,
    decrypt,
    decrypt_stream,
    encrypt,
    encrypt_stream,
    generate_key,
    read_header,
)

K1, K2 = bytes(range(32)), bytes(range(100, 132))
NAME = "segments/public.guests/0000000000000001-0000000000000002.seg"
CHUNK = 64
TAG = 16


@pytest.fixture
def keyring() -> Keyring:
    return Keyring({"k1": K1, "k2": K2}, active="k1")


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """*data* cut at the given offsets (any order, any values)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def layout(blob: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Header size and (start, end) of each chunk of an object written with CHUNK."""
    size = read_header(blob).size
    spans, start = [], size
    while start < len(blob):
        end = min(start + CHUNK + TAG, len(blob))
        spans.append((start, end))
        start = end
    return size, spans


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]


def streamed(data: bytes, keyring: Keyring, *, name: str = NAME) -> bytes:
    """Encrypted without declaring the length, as a writer streaming a snapshot would."""
    return b"".join(encrypt_stream([data], name=name, keyring=keyring, chunk_size=CHUNK))


DATA = os.urandom(CHUNK * 4 + 10)  # four full chunks and a short final one


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK * 3, 1000])
def test_round_trip(keyring: Keyring, size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data, NAME, keyring, chunk_size=CHUNK)
    assert decrypt(blob, NAME, keyring) == data
    assert decrypt(streamed(data, keyring), NAME, keyring) == data
    header = read_header(blob)
    assert (header.key_name, header.chunk_size, header.length) == ("k1", CHUNK, size)
    assert read_header(streamed(data, keyring)).length is None


def test_ciphertext_hides_the_plaintext_and_differs_each_time(keyring: Keyring) -> None:
    data = b"Zoe & Maelle, table 7, vegetarian " * 20
    first, second = (encrypt(data, NAME, keyring) for _ in range(2))
    assert first != second
    assert b"Maelle" not in first
    assert len(first) == read_header(first).size + len(data) + TAG


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=3000),
    chunk_size=st.integers(min_value=1, max_value=700),
    input_cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=8),
    output_cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=8),
    declare_length=st.booleans(),
)
def test_any_size_any_chunking_round_trips(
    data: bytes, chunk_size: int, input_cuts: list[int], output_cuts: list[int],
    declare_length: bool,
) -> None:
    keyring = Keyring({"k1": K1})
    blob = b"".join(encrypt_stream(
        pieces(data, input_cuts), name=NAME, keyring=keyring, chunk_size=chunk_size,
        length=len(data) if declare_length else None))
    assert b"".join(decrypt_stream(pieces(blob, output_cuts), name=NAME, keyring=keyring)) == data


def test_declared_length_must_match(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="declared as 10 bytes but is 9 bytes"):
        b"".join(encrypt_stream([b"x" * 9], name=NAME, keyring=keyring, length=10))
    with pytest.raises(ValueError, match="declared as 10 bytes but is longer"):
        b"".join(encrypt_stream([b"x" * 11], name=NAME, keyring=keyring, length=10))


def test_bad_arguments_fail_before_any_output(keyring: Keyring) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        encrypt_stream([b""], name=NAME, keyring=keyring, chunk_size=0)
    with pytest.raises(ValueError, match="needs a name"):
        encrypt_stream([b""], name="", keyring=keyring)


# --- tampering -------------------------------------------------------------------------------


def test_any_flipped_header_byte_is_tampering(keyring: Keyring) -> None:
    blob = encrypt(DATA, NAME, keyring, chunk_size=CHUNK)
    size, _ = layout(blob)
    for at in range(7, size):  # past magic, version, flags and the key name's length
        with pytest.raises(ObjectTampered, match=f"'{NAME}'"):
            decrypt(flip(blob, at), NAME, keyring)
    for at in (5, 6):  # flags, key name length: the digest catches them too
        with pytest.raises(ObjectTampered):
            decrypt(flip(blob, at), NAME, keyring)


def test_magic_and_version(keyring: Keyring) -> None:
    blob = encrypt(DATA, NAME, keyring)
    with pytest.raises(NotEncrypted, match="not an encrypted object"):
        decrypt(flip(blob, 0), NAME, keyring)
    with pytest.raises(NotEncrypted):
        decrypt(b"Obj\x01 an Avro file stored in the clear", NAME, keyring)
    with pytest.raises(UnsupportedVersion, match="version 0; this replicator reads version 1"):
        decrypt(flip(blob, 4), NAME, keyring)


@pytest.mark.parametrize("where", ["first byte", "middle", "tag"])
@pytest.mark.parametrize("chunk", [0, 2, 4])
def test_any_flipped_chunk_byte_is_tampering(keyring: Keyring, chunk: int, where: str) -> None:
    for blob in (encrypt(DATA, NAME, keyring, chunk_size=CHUNK), streamed(DATA, keyring)):
        _, spans = layout(blob)
        start, end = spans[chunk]
        at = {"first byte": start, "middle": (start + end) // 2, "tag": end - 1}[where]
        with pytest.raises(ObjectTampered, match=f"chunk {chunk} of object '{NAME}'"):
            decrypt(flip(blob, at), NAME, keyring)


def test_reordered_chunks(keyring: Keyring) -> None:
    for blob in (encrypt(DATA, NAME, keyring, chunk_size=CHUNK), streamed(DATA, keyring)):
        _, spans = layout(blob)
        (a0, a1), (b0, b1) = spans[1], spans[2]
        swapped = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
        with pytest.raises(ObjectTampered, match=r"chunk 1 .* reordered"):
            decrypt(swapped, NAME, keyring)


def test_chunk_or_header_from_another_object(keyring: Keyring) -> None:
    one = encrypt(DATA, NAME, keyring, chunk_size=CHUNK)
    other = encrypt(DATA, NAME, keyring, chunk_size=CHUNK)
    size, spans = layout(one)
    start, end = spans[1]
    with pytest.raises(ObjectTampered):
        decrypt(one[:start] + other[start:end] + one[end:], NAME, keyring)
    with pytest.raises(ObjectTampered):  # other's header, one's chunks
        decrypt(other[:size] + one[size:], NAME, keyring)


def test_trailing_bytes(keyring: Keyring) -> None:
    with pytest.raises(ObjectTampered, match="bytes after its final chunk"):
        decrypt(encrypt(DATA, NAME, keyring) + b"\x00", NAME, keyring)


# --- truncation ------------------------------------------------------------------------------


def test_missing_final_chunk(keyring: Keyring) -> None:
    for blob in (encrypt(DATA, NAME, keyring, chunk_size=CHUNK), streamed(DATA, keyring)):
        _, spans = layout(blob)
        with pytest.raises(ObjectTruncated, match=f"'{NAME}' is cut short"):
            decrypt(blob[:spans[-1][0]], NAME, keyring)
        with pytest.raises(ObjectTruncated):  # only the header left
            decrypt(blob[:spans[0][0]], NAME, keyring)


def test_cut_inside_a_chunk(keyring: Keyring) -> None:
    blob = encrypt(DATA, NAME, keyring, chunk_size=CHUNK)
    _, spans = layout(blob)
    for start, end in spans:
        for cut in (start + 1, (start + end) // 2, end - 1):
            with pytest.raises(ObjectTruncated, match="cut short inside chunk"):
                decrypt(blob[:cut], NAME, keyring)


def test_cut_inside_a_chunk_of_a_stream_of_unknown_length(keyring: Keyring) -> None:
    """Without a declared length a cut inside a chunk looks like a modified final chunk."""
    blob = streamed(DATA, keyring)
    _, spans = layout(blob)
    start, end = spans[2]
    with pytest.raises(ObjectTampered, match="or cut short inside it"):
        decrypt(blob[:(start + end) // 2], NAME, keyring)
    with pytest.raises(ObjectTruncated, match="chunk 2 is incomplete"):
        decrypt(blob[:start + TAG - 1], NAME, keyring)


def test_cut_inside_the_header(keyring: Keyring) -> None:
    blob = encrypt(DATA, NAME, keyring)
    for cut in (0, 2, 4, 6, 7, 50, read_header(blob).size - 1):
        with pytest.raises(ObjectTruncated, match="ends inside its header"):
            decrypt(blob[:cut], NAME, keyring)


# --- names and keys --------------------------------------------------------------------------


def test_swapped_object_name(keyring: Keyring) -> None:
    a = encrypt(b"rows of a", "segments/t/a.seg", keyring)
    with pytest.raises(ObjectNameMismatch, match=r"'segments/t/b\.seg' was encrypted under"):
        decrypt(a, "segments/t/b.seg", keyring)


def test_wrong_key(keyring: Keyring) -> None:
    blob = encrypt(DATA, NAME, keyring)
    impostor = Keyring({"k1": bytes(32)})
    with pytest.raises(WrongKey, match=f"'{NAME}'.*another key also named k1") as info:
        decrypt(blob, NAME, impostor)
    assert info.value.key_name == "k1"
    assert_no_secret(str(info.value))


def test_unknown_key(keyring: Keyring) -> None:
    blob = encrypt(DATA, NAME, keyring)
    with pytest.raises(UnknownKey, match=f"'{NAME}' was encrypted with key k1, which the "
                                         r"keyring does not hold \(it holds k2\)") as info:
        decrypt(blob, NAME, Keyring({"k2": K2}))
    assert info.value.key_name == "k1"
    assert_no_secret(str(info.value))


def test_rotation_keeps_old_objects_readable(keyring: Keyring) -> None:
    old = encrypt(b"before rotation", NAME, keyring)
    rotated = keyring.with_active("k2")
    new = encrypt(b"after rotation", NAME, rotated)
    assert (read_header(old).key_name, read_header(new).key_name) == ("k1", "k2")
    for ring in (keyring, rotated):
        assert decrypt(old, NAME, ring) == b"before rotation"
        assert decrypt(new, NAME, ring) == b"after rotation"
    with pytest.raises(UnknownKey):  # retiring k1 too early makes its objects unreadable
        decrypt(old, NAME, Keyring({"k2": K2}))


def test_every_failure_is_a_crypto_error() -> None:
    for cls in (KeyringError, UnknownKey, WrongKey, NotEncrypted, UnsupportedVersion,
                ObjectNameMismatch, ObjectTampered, ObjectTruncated):
        assert issubclass(cls, CryptoError)
    assert len({KeyringError, UnknownKey, WrongKey, NotEncrypted, UnsupportedVersion,
                ObjectNameMismatch, ObjectTampered, ObjectTruncated}) == 8


# --- the keyring -----------------------------------------------------------------------------


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def assert_no_secret(text: str) -> None:
    for key in (K1, K2):
        assert b64(key) not in text and key.hex() not in text and repr(key) not in text


def test_repr_shows_names_only(keyring: Keyring) -> None:
    assert repr(keyring) == "Keyring(active='k1', keys=['k1', 'k2'])"
    assert str(keyring) == repr(keyring)
    assert_no_secret(repr(keyring))


def test_from_env_picks_the_highest_name_or_the_named_one() -> None:
    env = {"REPLICATOR_KEK_2025_01": b64(K1), "REPLICATOR_KEK_2025_07": b64(K2), "HOME": "/"}
    ring = Keyring.from_env(env)
    assert (ring.active, ring.names) == ("2025_07", ("2025_01", "2025_07"))
    ring = Keyring.from_env({**env, "REPLICATOR_KEK_ACTIVE": "2025_01"})
    assert ring.active == "2025_01"
    assert decrypt(encrypt(b"x", NAME, ring), NAME, Keyring.from_env(env)) == b"x"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no key-encryption keys in the environment"),
        ({"REPLICATOR_KEK_A": "not base64!"}, "REPLICATOR_KEK_A is not valid base64"),
        ({"REPLICATOR_KEK_A": b64(K1[:16])}, "REPLICATOR_KEK_A must decode to 32 bytes, got 16"),
        ({"REPLICATOR_KEK_A": b64(K1), "REPLICATOR_KEK_ACTIVE": "B"},
         "REPLICATOR_KEK_ACTIVE names B, but REPLICATOR_KEK_B is not set"),
    ],
)
def test_from_env_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.from_env(env)
    assert_no_secret(str(info.value))


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# rotated yearly\nold {b64(K1)}\n\nnew {b64(K2)}\n")
    path.chmod(0o600)
    ring = Keyring.from_file(path)
    assert (ring.active, ring.names) == ("old", ("new", "old"))  # "old" sorts after "new"
    assert Keyring.from_file(path, active="new").active == "new"


def test_from_file_refuses_open_permissions(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"k1 {b64(K1)}\n")
    path.chmod(0o644)
    with pytest.raises(KeyringError, match=r"accessible to group or others \(mode 0644\)"):
        Keyring.from_file(path)
    assert Keyring.from_file(path, check_permissions=False).names == ("k1",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"k1 {b64(K1)} extra\n", "line 1: expected 'name base64', got 3 fields"),
        (f"k1 {b64(K1)}\nk1 {b64(K2)}\n", "line 2: key k1 appears twice"),
        ("k1 ***\n", r"key k1 \(.* line 1\) is not valid base64"),
        ("# nothing\n", "holds no keys"),
        (f"bad/name {b64(K1)}\n", "invalid key name 'bad/name'"),
    ],
)
def test_from_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.from_file(path)
    assert_no_secret(str(info.value))


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read key file"):
        Keyring.from_file(tmp_path / "absent")


def test_generated_keys_are_usable() -> None:
    key = generate_key()
    assert len(key) == 32 and key != generate_key()
    assert Keyring({"fresh": key}).active == "fresh"


# --- memory ----------------------------------------------------------------------------------


def test_memory_stays_bounded_by_the_chunk_size(keyring: Keyring) -> None:
    piece = os.urandom(1 << 20)
    total = 50 * len(piece)
    expected = hashlib.sha256()
    for _ in range(50):
        expected.update(piece)

    def source() -> Iterator[bytes]:
        for _ in range(50):
            yield piece

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        encrypted = encrypt_stream(source(), name=NAME, keyring=keyring)  # 1 MiB chunks
        got, size = hashlib.sha256(), 0
        for plain in decrypt_stream(encrypted, name=NAME, keyring=keyring):
            got.update(plain)
            size += len(plain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (size, got.digest()) == (total, expected.digest())
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.0f} MiB object"
