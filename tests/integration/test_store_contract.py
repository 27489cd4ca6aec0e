"""The storage contract (`connectors.base.ObjectStore`), checked against every connector.

Each test runs on memory, a local directory, and the real S3 (moto), Azure (Azurite) and GCS
(fake-gcs-server) emulators of the local stack, every store opened from a URL by
`open_store`, as the replicator opens its destinations. The last sections check the retry
wrapper, against an unreachable endpoint and against a scripted flaky store.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from connectors.base import ObjectInfo, ObjectStore
from connectors.errors import AlreadyExists, Fatal, NotFound, Retriable
from connectors.memory import MemoryStore
from connectors.registry import open_store
from connectors.retry import RetryingStore, RetryPolicy
from replicator.devstack.settings import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.conftest import StoreTarget

pytestmark = pytest.mark.integration

BACKENDS = ("memory", "local", "s3", "azure", "gcs")
CLOUD = ("s3", "azure", "gcs")
MIB = 1024 * 1024
THRESHOLD = 1 * MIB  # multipart above this in the large-object test
ENV: Mapping[str, Mapping[str, str]] = {
    "s3": {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY},
    "azure": {},  # the Azurite endpoint alone selects the public development key
    "gcs": {},  # an endpoint means anonymous requests to an emulator
}

Opener = Callable[..., ObjectStore]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Callable[..., str]]:
    """The backend's name, and a function (prefix, **options) -> store URL."""
    kind: str = request.param
    if kind == "memory":
        space = f"contract-{uuid.uuid4().hex}"
        request.addfinalizer(lambda: MemoryStore.discard(space))
        return kind, lambda prefix="", **_: f"mem://{space}/{prefix}"
    if kind == "local":
        def local(prefix: str = "", **_: int) -> str:
            root = tmp_path / "bucket" / prefix
            root.mkdir(parents=True, exist_ok=True)
            return root.as_uri()
        return kind, local
    target: StoreTarget = request.getfixturevalue(f"{kind}_target")

    def cloud(prefix: str = "", **options: int) -> str:
        parts = urlsplit(target.url)
        query = parts.query + "".join(f"&{name}={value}" for name, value in options.items())
        return urlunsplit((parts.scheme, parts.netloc, "/" + prefix, query, ""))
    return kind, cloud


@pytest.fixture
async def stores(backend: tuple[str, Callable[..., str]]) -> AsyncIterator[Opener]:
    """Opens stores of this test's backend (closed afterwards): `stores(prefix, **options)`.

    Options (`page_size`, `multipart_threshold`) apply to the cloud stores; memory and local
    stores have no pages or parts.
    """
    kind, url_of = backend
    opened: list[ObjectStore] = []

    def opener(prefix: str = "", **options: int) -> ObjectStore:
        store = open_store(url_of(prefix, **options), ENV.get(kind, {}))
        opened.append(store)
        return store

    yield opener
    for store in opened:
        await store.close()


async def keys_of(store: ObjectStore, prefix: str = "", *, after: str | None = None) -> list[str]:
    return [info.key async for info in store.list(prefix, after=after)]


# --- put, get, stat -----------------------------------------------------------------------


async def test_put_then_get_returns_the_same_bytes(stores: Opener) -> None:
    store = stores()
    key = "ns/segments/guests/0000000016B374D8-0000000016B37500.seg"
    data = bytes(range(256)) * 40 + b"\x00end"

    info = await store.put(key, data)

    assert (info.key, info.size, info.metadata) == (key, len(data), {})
    assert await store.get(key) == data
    stat = await store.stat(key)
    assert (stat.key, stat.size, stat.metadata) == (key, len(data), {})

    await store.put("empty", b"")
    assert await store.get("empty") == b""
    assert await store.get("empty", start=0, end=10) == b""
    assert (await store.stat("empty")).size == 0


async def test_a_closed_store_refuses_calls(stores: Opener) -> None:
    store = stores()
    await store.put("k", b"v")
    await store.close()
    await store.close()  # idempotent

    with pytest.raises(Fatal, match="closed"):
        await store.get("k")
    with pytest.raises(Fatal, match="closed"):
        await store.put("other", b"v")


@pytest.mark.parametrize(("start", "end"), [
    (0, 1), (10, 20), (0, None), (1000, None), (1000, 5000), (1023, 1024),
    (1024, None), (5000, 6000), (7, 7), (0, 0),
])
async def test_get_returns_the_byte_range_like_a_slice(stores: Opener, start: int,
                                                       end: int | None) -> None:
    store = stores()
    data = bytes(range(256)) * 4
    await store.put("obj", data)

    assert await store.get("obj", start=start, end=end) == data[start:end]


async def test_bad_ranges_and_keys_are_rejected_before_any_io(stores: Opener) -> None:
    store = stores()
    with pytest.raises(ValueError, match="start"):
        await store.get("obj", start=-1)
    with pytest.raises(ValueError, match="before its start"):
        await store.get("obj", start=5, end=4)
    for bad in ("", "/abs", "a//b", "a/./b", "../up", "trailing/", "nul\x00"):
        with pytest.raises(ValueError, match="key"):
            await store.put(bad, b"x")
        with pytest.raises(ValueError, match="key"):
            await store.get(bad)
    assert await keys_of(store) == []


async def test_put_is_create_only(stores: Opener) -> None:
    store = stores()
    await store.put("checkpoints/s3-main/0000000016B37500", b"first", metadata={"v": "1"})

    with pytest.raises(AlreadyExists) as caught:
        await store.put("checkpoints/s3-main/0000000016B37500", b"second", metadata={"v": "2"})

    assert "checkpoints/s3-main/0000000016B37500" in str(caught.value)
    assert store.url in str(caught.value)
    assert await store.get("checkpoints/s3-main/0000000016B37500") == b"first"
    assert (await store.stat("checkpoints/s3-main/0000000016B37500")).metadata == {"v": "1"}


async def test_concurrent_puts_of_one_key_have_exactly_one_winner(stores: Opener) -> None:
    store = stores()
    payloads = [f"writer-{n}".encode() * 100 for n in range(6)]

    results = await asyncio.gather(*(store.put("race", p) for p in payloads),
                                   return_exceptions=True)

    winners = [p for p, r in zip(payloads, results, strict=True) if isinstance(r, ObjectInfo)]
    assert len(winners) == 1, results
    assert all(isinstance(r, AlreadyExists) for r in results if not isinstance(r, ObjectInfo))
    assert await store.get("race") == winners[0]


async def test_a_missing_key_is_not_found(stores: Opener) -> None:
    store = stores()
    with pytest.raises(NotFound, match="no/such/key"):
        await store.get("no/such/key")
    with pytest.raises(NotFound, match="no/such/key"):
        await store.get("no/such/key", start=3, end=9)
    with pytest.raises(NotFound, match="no/such/key"):
        await store.stat("no/such/key")
    with pytest.raises(NotFound):
        await store.get("no/such/key", start=4, end=4)


async def test_metadata_round_trips(stores: Opener) -> None:
    store = stores()
    meta = {"cipher": "aes-256-gcm", "kek": "wedsync-2024", "first_lsn": "16/B374D848",
            "changes": "42", "note": "printable ASCII, spaces & symbols: ~!@#$%^*()"}

    info = await store.put("segments/guests/a.seg", b"payload", metadata=meta)

    assert info.metadata == meta
    assert (await store.stat("segments/guests/a.seg")).metadata == meta
    assert await store.get("segments/guests/a.seg") == b"payload"
    assert [i.metadata async for i in store.list()] == [{}]  # listings carry no metadata
    for bad in ({"Upper": "x"}, {"with-dash": "x"}, {"ok": "é"}, {"ok": "line\nbreak"}):
        with pytest.raises(ValueError, match="metadata"):
            await store.put("rejected", b"x", metadata=bad)
    with pytest.raises(NotFound):
        await store.stat("rejected")


# --- list ---------------------------------------------------------------------------------


async def test_list_is_in_key_order_with_prefix_and_after(stores: Opener) -> None:
    store = stores()
    keys = ["a-b", "a/b", "a/c/d", "b", "segments/guests/0000000000000010-0000000000000020.seg",
            "segments/guests/0000000000000021-0000000000000030.seg", "segments/vendors/x.seg",
            "transactions/0000000000000010-0000000000000030.seg"]
    for key in random.Random(7).sample(keys, len(keys)):
        await store.put(key, key.encode())

    assert await keys_of(store) == sorted(keys)  # '-' sorts before '/': byte order
    assert await keys_of(store, "a/") == ["a/b", "a/c/d"]
    assert await keys_of(store, "a") == ["a-b", "a/b", "a/c/d"]
    assert await keys_of(store, "segments/gu") == keys[4:6]
    assert await keys_of(store, after="a/b") == sorted(keys)[2:]
    assert await keys_of(store, after="a/bb") == sorted(keys)[2:]  # need not exist
    assert await keys_of(store, "segments/", after=keys[4]) == keys[5:7]
    assert await keys_of(store, "a/", after="0") == ["a/b", "a/c/d"]  # after below the prefix
    assert await keys_of(store, after="zzz") == []
    assert await keys_of(store, "nothing/") == []
    assert await keys_of(store, "../") == []
    listed = [info async for info in store.list("a/")]
    assert [(i.size, i.metadata) for i in listed] == [(3, {}), (5, {})]


async def test_list_follows_every_page(stores: Opener) -> None:
    store = stores(page_size=4)
    keys = [f"p/{n:04d}" for n in range(23)]
    await asyncio.gather(*(store.put(key, b"x") for key in keys))
    await store.put("q/outside", b"x")

    assert await keys_of(store, "p/") == keys
    assert await keys_of(store, "p/", after="p/0009") == keys[10:]
    assert await keys_of(store, after="p/0021") == [*keys[22:], "q/outside"]


# --- delete -------------------------------------------------------------------------------


async def test_delete_many_including_missing_keys(stores: Opener) -> None:
    store = stores()
    keys = [f"d/{n:03d}" for n in range(30)]
    await asyncio.gather(*(store.put(key, b"x") for key in keys))

    await store.delete([*keys[:20], "d/missing", "never/was"])
    await store.delete(key for key in keys[:3])  # again, and from a generator
    await store.delete([])

    assert await keys_of(store) == keys[20:]
    with pytest.raises(NotFound):
        await store.get(keys[0])
    await store.put(keys[0], b"again")  # a deleted name is free again
    assert await store.get(keys[0]) == b"again"


# --- large objects ------------------------------------------------------------------------


async def test_a_large_object_round_trips_in_parts_and_is_create_only(stores: Opener) -> None:
    store = stores(multipart_threshold=THRESHOLD)
    data = random.Random(1).randbytes(6 * MIB + 4321)  # two S3 parts, seven blocks/chunks
    meta = {"kind": "snapshot"}

    info = await store.put("snapshots/guests/16-B374D848/part-0.seg", data, metadata=meta)

    assert (info.size, info.metadata) == (len(data), meta)
    assert await store.get("snapshots/guests/16-B374D848/part-0.seg") == data
    stat = await store.stat("snapshots/guests/16-B374D848/part-0.seg")
    assert (stat.size, stat.metadata) == (len(data), meta)
    middle = 5 * MIB  # the S3 part boundary
    assert await store.get("snapshots/guests/16-B374D848/part-0.seg",
                           start=middle - 10, end=middle + 10) == data[middle - 10:middle + 10]

    # On fake-gcs-server this AlreadyExists comes from GcsStore's stat-before-upload guard:
    # the emulator ignores ifGenerationMatch=0 on resumable uploads and would overwrite. Real
    # GCS enforces the precondition, which the upload still sends.
    with pytest.raises(AlreadyExists):
        await store.put("snapshots/guests/16-B374D848/part-0.seg", data[::-1])
    assert await store.get("snapshots/guests/16-B374D848/part-0.seg") == data

    await store.put("small", b"tiny")
    with pytest.raises(AlreadyExists):  # same emulator caveat on GCS
        await store.put("small", data)
    assert await store.get("small") == b"tiny"
    assert await keys_of(store) == ["small", "snapshots/guests/16-B374D848/part-0.seg"]


# --- prefixes -----------------------------------------------------------------------------


async def test_a_store_sees_only_its_own_prefix(stores: Opener) -> None:
    a, b, ab, root = stores("tenant/a"), stores("tenant/b"), stores("tenant/ab"), stores()
    await a.put("x", b"A")
    await b.put("x", b"B")
    await ab.put("x", b"AB")

    assert await keys_of(a) == ["x"]
    assert await a.get("x") == b"A"
    assert await keys_of(ab) == ["x"]
    assert await keys_of(root) == ["tenant/a/x", "tenant/ab/x", "tenant/b/x"]
    assert await root.get("tenant/a/x") == b"A"
    await b.delete(["x"])
    assert await a.get("x") == b"A"
    assert await keys_of(root, after="tenant/a/x") == ["tenant/ab/x"]
    with pytest.raises(AlreadyExists):
        await root.put("tenant/a/x", b"other")


# --- outages ------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("kind", CLOUD)
async def test_an_unreachable_store_is_retriable_then_given_up_on(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    url = {"s3": f"s3://wedsync/ns?endpoint=http://127.0.0.1:{port}&region=us-east-1",
           "azure": f"az://wedsync/ns?endpoint=http://127.0.0.1:{port}/devstoreaccount1",
           "gcs": f"gs://wedsync/ns?endpoint=http://127.0.0.1:{port}"}[kind]
    policy = RetryPolicy(base_s=0.01, max_s=0.05, max_attempts=3, deadline_s=10)
    caplog.set_level(logging.INFO, logger="connectors.retry")

    async with RetryingStore(open_store(url, ENV[kind]), policy) as store:
        started = time.monotonic()
        with pytest.raises(Retriable) as caught:
            await store.put("segments/x.seg", b"x")
        elapsed = time.monotonic() - started

    message = str(caught.value)
    assert elapsed < 10, elapsed
    assert f"127.0.0.1:{port}" in message and "'segments/x.seg'" in message
    assert "gave up after 3 attempts" in message
    assert isinstance(caught.value.__cause__, Retriable)  # the last raw failure, chained
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # once, not per attempt


async def test_a_bare_store_reports_an_outage_at_once() -> None:
    port = closed_port()
    async with open_store(f"gs://wedsync/?endpoint=http://127.0.0.1:{port}", {}) as store:
        started = time.monotonic()
        with pytest.raises(Retriable, match=f"127.0.0.1:{port}"):
            await store.stat("k")
        assert time.monotonic() - started < 5


# --- retries, against a scripted store ----------------------------------------------------


class Flaky(ObjectStore):
    """A memory store whose calls fail with `Retriable` as scripted."""

    def __init__(self) -> None:
        self.inner = MemoryStore(f"flaky-{uuid.uuid4().hex}")
        self.url = self.inner.url
        self.failures: dict[str, int] = {}  # operation -> failures left
        self.calls: dict[str, int] = {}
        self.lose_put_answer = False
        self.list_breaks_after: int | None = None
        self.raise_instead: Exception | None = None

    def _enter(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        if self.raise_instead is not None:
            raise self.raise_instead
        if self.failures.get(op, 0) > 0:
            self.failures[op] -= 1
            raise Retriable("scripted failure", url=self.url, key=op)

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        self._enter("put")
        info = await self.inner.put(key, data, metadata=metadata)
        if self.lose_put_answer:
            self.lose_put_answer = False
            raise Retriable("connection reset after the upload", url=self.url, key=key)
        return info

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        self._enter("get")
        return await self.inner.get(key, start=start, end=end)

    async def stat(self, key: str) -> ObjectInfo:
        self._enter("stat")
        return await self.inner.stat(key)

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        self._enter("list")
        count = 0
        async for info in self.inner.list(prefix, after=after):
            if self.list_breaks_after is not None and count == self.list_breaks_after:
                self.list_breaks_after = None
                raise Retriable("connection reset mid-listing", url=self.url)
            count += 1
            yield info

    async def delete(self, keys: Iterable[str]) -> None:
        self._enter("delete")
        await self.inner.delete(keys)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    store = Flaky()
    yield store
    MemoryStore.discard(store.inner.url.split("/")[2])


FAST = RetryPolicy(base_s=0.001, max_s=0.004, max_attempts=5, deadline_s=5)


async def test_retry_recovers_and_logs_once_each_way(flaky: Flaky,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="connectors.retry")
    store = RetryingStore(flaky, FAST)
    await flaky.inner.put("k", b"v")
    flaky.failures = {"get": 3}

    assert await store.get("k") == b"v"
    assert await store.get("k") == b"v"

    assert flaky.calls["get"] == 5
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    failing, recovered = (r.getMessage() for r in caplog.records)
    assert failing.startswith(f"object store {flaky.url} is failing, retrying with backoff")
    assert recovered.startswith(f"object store {flaky.url} recovered after")
    assert recovered.endswith("and 3 failed attempts")


@pytest.mark.parametrize("error", [
    NotFound("gone", url="mem://x/", key="k"), Fatal("denied", url="mem://x/", key="k"),
    AlreadyExists("there", url="mem://x/", key="k"),
])
async def test_only_retriable_errors_are_retried(flaky: Flaky, error: Exception) -> None:
    flaky.raise_instead = error
    with pytest.raises(type(error)):
        await RetryingStore(flaky, FAST).stat("k")
    assert flaky.calls["stat"] == 1


async def test_retry_gives_up_with_capped_full_jitter_backoff(flaky: Flaky) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(base_s=1.0, max_s=4.0, max_attempts=6, deadline_s=1000)
    flaky.failures = {"delete": 100}
    store = RetryingStore(flaky, policy, sleep=sleep, rng=random.Random(3))

    with pytest.raises(Retriable, match="gave up after 6 attempts") as caught:
        await store.delete(["k"])

    assert flaky.calls["delete"] == 6
    assert caught.value.key == "delete" and caught.value.url == flaky.url
    assert len(waits) == 5
    assert all(0 <= w <= c for w, c in zip(waits, [1, 2, 4, 4, 4], strict=True)), waits


async def test_retry_stops_at_the_deadline(flaky: Flaky) -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    policy = RetryPolicy(base_s=10.0, max_s=10.0, max_attempts=1000, deadline_s=30)
    flaky.failures = {"stat": 10_000}
    store = RetryingStore(flaky, policy, sleep=sleep, clock=lambda: now[0])

    with pytest.raises(Retriable, match="gave up"):
        await store.stat("k")
    assert now[0] <= 30


async def test_cancellation_is_not_swallowed_and_is_silent(
        flaky: Flaky, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="connectors.retry")
    flaky.failures = {"get": 10_000}
    waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.sleep(seconds)

    store = RetryingStore(flaky, RetryPolicy(base_s=30, max_s=30, deadline_s=600),
                          sleep=sleep, rng=random.Random(0))
    task = asyncio.create_task(store.get("k"))
    await waiting.wait()  # the call is in its backoff wait

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert [r.levelname for r in caplog.records] == ["WARNING"]  # failing began; nothing more


async def test_a_put_whose_answer_was_lost_is_not_reported_as_a_conflict(flaky: Flaky) -> None:
    store = RetryingStore(flaky, FAST)
    flaky.lose_put_answer = True

    info = await store.put("seg", b"payload", metadata={"v": "1"})

    assert (info.key, info.size, info.metadata) == ("seg", 7, {"v": "1"})
    assert flaky.calls["put"] == 2
    with pytest.raises(AlreadyExists):  # without a retry, the same bytes are a plain conflict
        await store.put("seg", b"payload", metadata={"v": "1"})


async def test_a_retried_put_that_meets_another_writers_object_is_a_conflict(
        flaky: Flaky) -> None:
    async def another_writer_meanwhile(_: float) -> None:
        await flaky.inner.put("seg", b"someone else's")

    store = RetryingStore(flaky, FAST, sleep=another_writer_meanwhile)
    flaky.failures = {"put": 1}

    with pytest.raises(AlreadyExists):
        await store.put("seg", b"mine")
    assert await flaky.inner.get("seg") == b"someone else's"


async def test_a_listing_resumes_after_the_last_key_it_yielded(flaky: Flaky) -> None:
    keys = [f"k{n:02d}" for n in range(10)]
    for key in keys:
        await flaky.inner.put(key, b"x")
    flaky.list_breaks_after = 4

    assert await keys_of(RetryingStore(flaky, FAST)) == keys
    assert flaky.calls["list"] == 2
