"""Google Cloud Storage (`gs://bucket/prefix?endpoint=…`), via google-cloud-storage.

The SDK is blocking, so every call runs in a worker thread (`asyncio.to_thread`); an object
store call is dominated by the network round trip, and the thread hop costs little next to it.

Create-only writes carry `ifGenerationMatch=0` ("only if no live object has this name"). Up
to the multipart threshold an object goes in one request; above it, as a resumable upload in
chunks, which the service makes visible at once when the last chunk lands. fake-gcs-server, the
emulator the tests run against, ignores the precondition on resumable uploads and overwrites,
so a resumable put first checks that the name is free. The precondition stays in the call: on
the real service it is what stops a concurrent writer between the check and the upload.

Deletes go one request per key, a bounded number at a time (the JSON API has no multi-object
delete; a batch request is the same per-key calls in one envelope). The SDK's own retries are
off (`retry=None`): `connectors.retry` is the one retry policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

from connectors.base import (
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PAGE_SIZE,
    ObjectInfo,
    ObjectStore,
    check_key,
    check_metadata,
    check_range,
    join_prefix,
    run_bounded,
)
from connectors.errors import (
    AlreadyExists,
    Fatal,
    NotFound,
    Retriable,
    StoreError,
    describe,
    safe_url,
    translated,
)

__all__ = ["GcsStore"]

T = TypeVar("T")

_SDK_SINGLE_REQUEST_MAX = 8 * 1024 * 1024  # above this the SDK always uses a resumable upload
_CHUNK_UNIT = 256 * 1024  # resumable chunks are multiples of 256 KiB
_TIMEOUT = (10.0, 60.0)  # connect, read
_DELETE_CONCURRENCY = 8


class GcsStore(ObjectStore):
    """Objects under *prefix* in the GCS *bucket*.

    With *endpoint* (an emulator), requests are anonymous. Otherwise the credentials come from
    the service-account file *credentials_file*, else Application Default Credentials.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 credentials_file: str | None = None, project: str | None = None,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if not bucket:
            raise ValueError("GCS bucket name is empty")
        if multipart_threshold < 1 or not 1 <= page_size <= 1000:
            raise ValueError("multipart_threshold must be >= 1 and page_size in 1..1000")
        self._bucket_name = bucket
        self._prefix = join_prefix(prefix)
        self._endpoint = endpoint
        self._credentials_file = credentials_file
        self._project = project
        self._resumable_above = min(multipart_threshold, _SDK_SINGLE_REQUEST_MAX)
        self._chunk_size = -(-multipart_threshold // _CHUNK_UNIT) * _CHUNK_UNIT
        self._page_size = page_size
        self.url = f"gs://{bucket}/{self._prefix}" + (
            f"?endpoint={safe_url(endpoint)}" if endpoint else "")
        self._client: Any = None
        self._bucket: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        name = self._name(key)
        meta = check_metadata(metadata)
        payload = bytes(data)

        def upload(bucket: Any) -> ObjectInfo:
            blob = bucket.blob(name)
            blob.metadata = meta or None
            if len(payload) <= self._resumable_above:
                blob.upload_from_string(payload, content_type="application/octet-stream",
                                        if_generation_match=0, retry=None, timeout=_TIMEOUT)
            else:
                # The emulator's gap (see the module docstring): check, then keep the
                # precondition for the real service.
                if bucket.get_blob(name, retry=None, timeout=_TIMEOUT) is not None:
                    raise AlreadyExists("object already exists", url=self.url, key=key)
                blob.chunk_size = self._chunk_size
                # size=None: with a known size of at most 8 MiB the SDK would not resume.
                blob.upload_from_file(io.BytesIO(payload), size=None,
                                      content_type="application/octet-stream",
                                      if_generation_match=0, retry=None, timeout=_TIMEOUT)
            return ObjectInfo(key, len(payload), meta, _generation(blob))

        return await self._call(upload, key, creating=True)

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        name = self._name(key)
        check_range(start, end)
        if end == start:  # HTTP cannot ask for zero bytes; existence still matters
            await self.stat(key)
            return b""

        def download(bucket: Any) -> bytes:
            from google.api_core.exceptions import RequestRangeNotSatisfiable

            ranged = start > 0 or end is not None
            try:
                data: bytes = bucket.blob(name).download_as_bytes(
                    start=start if ranged else None, end=None if end is None else end - 1,
                    retry=None, timeout=_TIMEOUT)
            except RequestRangeNotSatisfiable:  # starts at or past the end
                return b""
            return data

        return await self._call(download, key)

    async def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)

        def lookup(bucket: Any) -> ObjectInfo:
            blob = bucket.get_blob(name, retry=None, timeout=_TIMEOUT)
            if blob is None:
                raise NotFound("object does not exist", url=self.url, key=key)
            return ObjectInfo(key, blob.size, dict(blob.metadata or {}), _generation(blob))

        return await self._call(lookup, key)

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        first = None if after is None else self._prefix + after

        def start(bucket: Any) -> Any:
            # start_offset is inclusive; the filter below drops `after` itself.
            return bucket.client.list_blobs(
                bucket, prefix=self._prefix + prefix, start_offset=first,
                page_size=self._page_size, retry=None, timeout=_TIMEOUT).pages

        def next_page(_: Any) -> list[tuple[str, int, str | None]] | None:
            page = next(pages, None)
            return None if page is None else [(b.name, b.size, _generation(b)) for b in page]

        pages = await self._call(start, None)
        while (items := await self._call(next_page, None)) is not None:
            for name, size, generation in items:
                if first is None or name > first:
                    yield ObjectInfo(name[len(self._prefix):], size, {}, generation)

    async def delete(self, keys: Iterable[str]) -> None:
        names = [(key, self._name(key)) for key in keys]

        def remover(key: str, name: str) -> Callable[[], Any]:
            def remove(bucket: Any) -> None:
                from google.api_core.exceptions import NotFound as Missing

                # A missing bucket answers 404 too; the next put or list reports it.
                with contextlib.suppress(Missing):
                    bucket.blob(name).delete(retry=None, timeout=_TIMEOUT)
            return lambda: self._call(remove, key)

        await run_bounded([remover(k, n) for k, n in names], _DELETE_CONCURRENCY)

    async def close(self) -> None:
        self._closed = True
        client, self._client, self._bucket = self._client, None, None
        if client is not None:
            await asyncio.to_thread(client.close)

    # --- helpers --------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    async def _call(self, work: Callable[[Any], T], key: str | None, *,
                    creating: bool = False) -> T:
        """Run *work(bucket)* in a worker thread, errors mapped at the boundary."""
        bucket = await self._open()
        with translated(lambda exc: self._error(exc, key, creating=creating)):
            return await asyncio.to_thread(work, bucket)

    async def _open(self) -> Any:
        async with self._lock:
            if self._closed:
                raise Fatal("store is closed", url=self.url)
            if self._bucket is None:
                with translated(self._credentials_error):
                    self._client = await asyncio.to_thread(self._make_client)
                self._bucket = self._client.bucket(self._bucket_name)
            return self._bucket

    def _make_client(self) -> Any:
        from google.cloud import storage

        if self._endpoint:
            from google.auth.credentials import AnonymousCredentials

            return storage.Client(project=self._project or "emulator",
                                  credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                                  client_options={"api_endpoint": self._endpoint})
        if self._credentials_file:
            return storage.Client.from_service_account_json(self._credentials_file,
                                                            project=self._project)
        return storage.Client(project=self._project)

    def _credentials_error(self, exc: Exception) -> StoreError:
        return Fatal(f"no usable Google credentials ({describe(exc)}): set "
                     "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
                     "where Application Default Credentials exist", url=self.url)

    def _error(self, exc: Exception, key: str | None, *, creating: bool = False) -> StoreError:
        import requests
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth
        from google.cloud.storage.exceptions import DataCorruption

        status = exc.code if isinstance(exc, api.GoogleAPICallError) else None
        detail = describe(exc)
        if status == 404:
            # Reading a missing object and a missing bucket both answer 404; a put or a list
            # can only mean the bucket.
            if creating or key is None:
                return Fatal(f"bucket does not exist ({detail})", url=self.url, key=key)
            return NotFound("object does not exist", url=self.url, key=key)
        if creating and status == 412:
            return AlreadyExists("object already exists", url=self.url, key=key)
        if status in (401, 403) or isinstance(exc, auth.RefreshError):
            return Fatal(f"access denied, check the credentials and bucket permissions "
                         f"({detail})", url=self.url, key=key)
        if status is not None and (status >= 500 or status in (408, 429)):
            return Retriable(detail, url=self.url, key=key)
        if isinstance(exc, auth.DefaultCredentialsError):
            return self._credentials_error(exc)
        if isinstance(exc, (requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError, auth.TransportError,
                            DataCorruption, OSError, TimeoutError)):
            return Retriable(f"GCS unreachable or interrupted: {detail}", url=self.url, key=key)
        return Fatal(detail, url=self.url, key=key)


def _generation(blob: Any) -> str | None:
    return None if blob.generation is None else str(blob.generation)
