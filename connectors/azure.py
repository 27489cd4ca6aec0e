"""Azure Blob Storage (`az://container/prefix?endpoint=…`), via azure.storage.blob.aio.

Create-only writes send `If-None-Match: *` (`match_condition=MatchConditions.IfMissing`) on Put
Blob, or for objects above the multipart threshold on Put Block List after staging the blocks:
the blob appears at once when the block list commits, and a 409/412 means it existed. Block ids
carry a random upload id, so two writers racing on one name never commit each other's blocks;
uncommitted blocks are garbage-collected by the service. Never pass `etag="*"` together with
`IfMissing`: the async client forwards it to aiohttp, which fails with a TypeError.

Deletes go one request per key, a bounded number at a time. Blob batch delete would save
round trips on Azure, but Azurite's batch endpoint fails, and a code path the tests cannot
reach is a code path that breaks on the day it is needed.

The SDK's own retries are off (`retry_total=0`): `connectors.retry` is the one retry policy.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

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

__all__ = ["AzureStore"]

_MAX_BLOCKS = 50_000
_BLOCK_CONCURRENCY = 4
_DELETE_CONCURRENCY = 16


class AzureStore(ObjectStore):
    """Objects under *prefix* in the blob *container* of the account at *account_url*.

    Authenticates with the shared key (*account_name*, *account_key*) or a SAS token
    (*sas_token*); exactly one of the two must be given.
    """

    def __init__(self, container: str, prefix: str = "", *, account_url: str,
                 account_name: str | None = None, account_key: str | None = None,
                 sas_token: str | None = None,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if not container:
            raise ValueError("Azure container name is empty")
        if (account_key is None) == (sas_token is None) or (account_key and not account_name):
            raise ValueError("give account_name with account_key, or sas_token")
        if multipart_threshold < 1 or not 1 <= page_size <= 5000:
            raise ValueError("multipart_threshold must be >= 1 and page_size in 1..5000")
        self._container_name = container
        self._prefix = join_prefix(prefix)
        self._account_url = account_url
        self._credential: Any = (
            sas_token if sas_token is not None
            else {"account_name": account_name, "account_key": account_key})
        self._threshold = multipart_threshold
        self._page_size = page_size
        self.url = f"az://{container}/{self._prefix}?endpoint={safe_url(account_url)}"
        self._container: Any = None
        self._closed = False

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        from azure.core import MatchConditions

        name = self._name(key)
        meta = check_metadata(metadata)
        with translated(lambda exc: self._error(exc, key, creating=True)):
            blob = self._client().get_blob_client(name)
            if len(data) > self._threshold:
                result = await self._put_blocks(blob, bytes(data), meta)
            else:
                result = await blob.upload_blob(bytes(data), blob_type="BlockBlob",
                                                metadata=meta,
                                                match_condition=MatchConditions.IfMissing)
        return ObjectInfo(key, len(data), meta, result.get("etag"))

    async def _put_blocks(self, blob: Any, data: bytes, meta: dict[str, str]) -> Any:
        from azure.core import MatchConditions

        size = max(self._threshold, -(-len(data) // _MAX_BLOCKS))
        upload = uuid.uuid4().hex
        ids = [f"{upload}-{n:06d}" for n in range(-(-len(data) // size))]

        async def stage(n: int) -> None:
            await blob.stage_block(ids[n], data[n * size:(n + 1) * size])

        await run_bounded([functools.partial(stage, n) for n in range(len(ids))],
                          _BLOCK_CONCURRENCY)
        return await blob.commit_block_list(ids, metadata=meta,
                                            match_condition=MatchConditions.IfMissing)

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        name = self._name(key)
        check_range(start, end)
        if end == start:  # HTTP cannot ask for zero bytes; existence still matters
            await self.stat(key)
            return b""
        with translated(lambda exc: self._error(exc, key)):
            container = self._client()
            try:
                ranged = start > 0 or end is not None
                stream = await container.download_blob(
                    name, offset=start if ranged else None,
                    length=None if end is None else end - start)
            except Exception as exc:
                if getattr(exc, "status_code", None) == 416:  # starts at or past the end
                    return b""
                raise
            data: bytes = await stream.readall()
        return data

    async def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        with translated(lambda exc: self._error(exc, key)):
            props = await self._client().get_blob_client(name).get_blob_properties()
        return ObjectInfo(key, props.size, dict(props.metadata or {}), props.etag)

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        # Azure has no start-after: its continuation marker is opaque. Filter on our side.
        first = None if after is None else self._prefix + after
        with translated(lambda exc: self._error(exc, None)):
            pages = self._client().list_blobs(name_starts_with=self._prefix + prefix,
                                              results_per_page=self._page_size).by_page()
        while True:
            with translated(lambda exc: self._error(exc, None)):
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    return
                items = [item async for item in page]
            for item in items:
                if first is None or item.name > first:
                    yield ObjectInfo(item.name[len(self._prefix):], item.size, {}, item.etag)

    async def delete(self, keys: Iterable[str]) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        names = [(key, self._name(key)) for key in keys]

        async def remove(key: str, name: str) -> None:
            with translated(lambda exc: self._error(exc, key)):
                try:
                    await self._client().delete_blob(name)
                except ResourceNotFoundError as exc:
                    if _code(exc) == "ContainerNotFound":
                        raise
        await run_bounded([functools.partial(remove, k, n) for k, n in names],
                          _DELETE_CONCURRENCY)

    async def close(self) -> None:
        self._closed = True
        container, self._container = self._container, None
        if container is not None:
            await container.close()

    # --- helpers --------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _client(self) -> Any:
        if self._closed:
            raise Fatal("store is closed", url=self.url)
        if self._container is None:
            from azure.storage.blob.aio import ContainerClient

            self._container = ContainerClient(
                self._account_url, self._container_name, credential=self._credential,
                retry_total=0, connection_timeout=10, read_timeout=60,
                max_single_put_size=self._threshold)
        return self._container

    def _error(self, exc: Exception, key: str | None, *, creating: bool = False) -> StoreError:
        from azure.core import exceptions as az

        code = _code(exc)
        status = getattr(exc, "status_code", None) or 0
        detail = f"Azure {code or status}: {describe(exc)}" if code or status else describe(exc)
        if isinstance(exc, az.ResourceNotFoundError) or status == 404:
            if code == "ContainerNotFound":
                return Fatal(f"container does not exist ({detail})", url=self.url, key=key)
            return NotFound("object does not exist", url=self.url, key=key)
        if creating and (isinstance(exc, (az.ResourceExistsError, az.ResourceModifiedError))
                         or status in (409, 412)):
            return AlreadyExists("object already exists", url=self.url, key=key)
        if isinstance(exc, az.ClientAuthenticationError) or status in (401, 403):
            return Fatal(f"access denied, check the account key or SAS token ({detail})",
                         url=self.url, key=key)
        if status >= 500 or status in (408, 429):
            return Retriable(detail, url=self.url, key=key)
        if isinstance(exc, (az.ServiceRequestError, az.ServiceResponseError, OSError,
                            TimeoutError)) or _is_aiohttp_error(exc):
            return Retriable(f"Azure unreachable or interrupted: {describe(exc)}",
                             url=self.url, key=key)
        return Fatal(detail, url=self.url, key=key)


def _code(exc: Exception) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _is_aiohttp_error(exc: Exception) -> bool:
    import aiohttp

    return isinstance(exc, aiohttp.ClientError)
