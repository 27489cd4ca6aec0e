"""Amazon S3 and S3-compatible services (`s3://bucket/prefix?endpoint=…&region=…`), via aiobotocore.

Create-only writes use `If-None-Match: *`: on PutObject for objects up to the multipart
threshold, and on CompleteMultipartUpload above it, so the object appears at once when the
last step succeeds, and a 412 means someone else's object is there. A failed multipart upload
is aborted on the way out; give the bucket a lifecycle rule that aborts incomplete multipart
uploads too, for the ones a crash leaves behind.

botocore's own retries are off (one attempt per call): `connectors.retry` is the single retry
policy, so an outage is reported after a bounded, known time instead of retries multiplying.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
    redact,
    safe_url,
    translated,
)

__all__ = ["S3Store"]

_MIN_PART = 5 * 1024 * 1024  # S3 rejects smaller parts, except the last
_MAX_PARTS = 10_000
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_PART_CONCURRENCY = 4
_AUTH_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                         "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem"})
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError",
                              "ServiceUnavailable", "ConditionalRequestConflict",
                              "OperationAborted", "RequestTimeTooSkewed", "Throttling"})


class S3Store(ObjectStore):
    """Objects under *prefix* in an S3 *bucket*.

    Credentials: *access_key_id*/*secret_access_key* (and *session_token*) when given, else
    botocore's standard chain (*profile*, environment, instance role). *endpoint* points at
    an S3-compatible service (moto, MinIO), addressed path-style.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, session_token: str | None = None,
                 profile: str | None = None,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if not bucket:
            raise ValueError("S3 bucket name is empty")
        if multipart_threshold < 1 or not 1 <= page_size <= 1000:
            raise ValueError("multipart_threshold must be >= 1 and page_size in 1..1000")
        self._bucket = bucket
        self._prefix = join_prefix(prefix)
        self._endpoint = endpoint
        self._region = region
        self._credentials = (access_key_id, secret_access_key, session_token)
        self._profile = profile
        self._threshold = multipart_threshold
        self._page_size = page_size
        self.url = f"s3://{bucket}/{self._prefix}" + (
            f"?endpoint={safe_url(endpoint)}" if endpoint else "")
        self._client: Any = None
        self._client_context: Any = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        name = self._name(key)
        meta = check_metadata(metadata)
        with translated(lambda exc: self._error(exc, key, creating=True)):
            client = await self._s3()
            if len(data) > self._threshold:
                etag = await self._put_multipart(client, name, bytes(data), meta)
            else:
                response = await client.put_object(Bucket=self._bucket, Key=name,
                                                   Body=bytes(data),
                                                   Metadata=meta, IfNoneMatch="*")
                etag = response.get("ETag")
        return ObjectInfo(key, len(data), meta, etag)

    async def _put_multipart(self, client: Any, name: str, data: bytes,
                             meta: dict[str, str]) -> str | None:
        part_size = max(self._threshold, _MIN_PART, -(-len(data) // _MAX_PARTS))
        upload = await client.create_multipart_upload(
            Bucket=self._bucket, Key=name, Metadata=meta, ChecksumAlgorithm="CRC32")
        upload_id = upload["UploadId"]

        async def send(number: int, offset: int) -> dict[str, Any]:
            response = await client.upload_part(
                Bucket=self._bucket, Key=name, UploadId=upload_id, PartNumber=number,
                Body=data[offset:offset + part_size], ChecksumAlgorithm="CRC32")
            return {"PartNumber": number, "ETag": response["ETag"],
                    "ChecksumCRC32": response["ChecksumCRC32"]}

        try:
            parts = await run_bounded(
                [functools.partial(send, n, o)
                 for n, o in enumerate(range(0, len(data), part_size), start=1)],
                _PART_CONCURRENCY)
            response = await client.complete_multipart_upload(
                Bucket=self._bucket, Key=name, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except BaseException:
            # Parts of an abandoned upload are billed until aborted; best effort, since the
            # original error is the one to report.
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=self._bucket, Key=name,
                                                    UploadId=upload_id)
            raise
        etag: str | None = response.get("ETag")
        return etag

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        name = self._name(key)
        check_range(start, end)
        if end == start:  # HTTP cannot ask for zero bytes; existence still matters
            await self.stat(key)
            return b""
        extra = {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with translated(lambda exc: self._error(exc, key)):
            client = await self._s3()
            try:
                response = await client.get_object(Bucket=self._bucket, Key=name, **extra)
            except Exception as exc:
                if _status(exc) == 416:  # the range starts at or past the end
                    return b""
                raise
            async with response["Body"] as body:
                data: bytes = await body.read()
        return data

    async def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        with translated(lambda exc: self._error(exc, key)):
            client = await self._s3()
            response = await client.head_object(Bucket=self._bucket, Key=name)
        return ObjectInfo(key, response["ContentLength"], dict(response.get("Metadata", {})),
                          response.get("ETag"))

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        request: dict[str, Any] = {"Bucket": self._bucket, "Prefix": self._prefix + prefix,
                                   "MaxKeys": self._page_size}
        if after is not None:
            request["StartAfter"] = self._prefix + after
        while True:
            with translated(lambda exc: self._error(exc, None)):
                client = await self._s3()
                page = await client.list_objects_v2(**request)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(self._prefix):], item["Size"], {},
                                 item.get("ETag"))
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    async def delete(self, keys: Iterable[str]) -> None:
        names = [self._name(key) for key in keys]
        for first in range(0, len(names), _DELETE_BATCH):
            batch = names[first:first + _DELETE_BATCH]
            with translated(lambda exc: self._error(exc, None)):
                client = await self._s3()
                response = await client.delete_objects(Bucket=self._bucket, Delete={
                    "Objects": [{"Key": name} for name in batch], "Quiet": True})
            for failure in response.get("Errors", []):
                if failure.get("Code") != "NoSuchKey":
                    raise self._error_code(failure.get("Code", ""), 0,
                                           failure.get("Message", ""),
                                           failure["Key"][len(self._prefix):], False)

    async def close(self) -> None:
        self._closed = True
        context, self._client_context, self._client = self._client_context, None, None
        if context is not None:
            await context.__aexit__(None, None, None)

    # --- helpers --------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    async def _s3(self) -> Any:
        async with self._lock:
            if self._closed:
                raise Fatal("store is closed", url=self.url)
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import AioSession

                access_key, secret_key, token = self._credentials
                context = AioSession(profile=self._profile).create_client(
                    "s3", endpoint_url=self._endpoint, region_name=self._region,
                    aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                    aws_session_token=token,
                    config=AioConfig(
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=10, read_timeout=60,
                        s3={"addressing_style": "path"} if self._endpoint else None))
                self._client = await context.__aenter__()
                self._client_context = context
            return self._client

    def _error(self, exc: Exception, key: str | None, *, creating: bool = False) -> StoreError:
        from botocore import exceptions as boto

        if isinstance(exc, boto.ClientError):
            error = exc.response.get("Error", {})
            return self._error_code(str(error.get("Code", "")), _status(exc),
                                    str(error.get("Message", "")), key, creating)
        if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
            return Fatal(self._no_credentials(), url=self.url, key=key)
        if isinstance(exc, boto.SSLError):
            return Fatal(f"TLS failure: {describe(exc)}", url=self.url, key=key)
        if isinstance(exc, (boto.ConnectionError, boto.HTTPClientError, boto.ChecksumError,
                            boto.IncompleteReadError, boto.CredentialRetrievalError,
                            OSError, TimeoutError)) or _is_aiohttp_error(exc):
            return Retriable(f"S3 unreachable or interrupted: {describe(exc)}",
                             url=self.url, key=key)
        return Fatal(describe(exc), url=self.url, key=key)

    def _no_credentials(self) -> str:
        """What is missing, by name, when botocore found no credentials."""
        if self._profile:
            return (f"no usable AWS credentials: the profile {self._profile!r} (AWS_PROFILE) "
                    "gave none; fix it, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return ("no AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set, "
                "nor AWS_PROFILE, and no shared credentials file or instance role gave any; "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or role)")

    def _error_code(self, code: str, status: int, message: str, key: str | None,
                    creating: bool) -> StoreError:
        detail = redact(f"S3 {code or status}: {message}" if message else f"S3 {code or status}")
        if code == "NoSuchBucket":
            return Fatal(f"bucket does not exist ({detail})", url=self.url, key=key)
        if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and not code):
            return NotFound("object does not exist", url=self.url, key=key)
        if creating and (status == 412 or code == "PreconditionFailed"):
            return AlreadyExists("object already exists", url=self.url, key=key)
        if code in _AUTH_CODES or status in (401, 403):
            return Fatal(f"access denied, check the credentials and the bucket policy ({detail})",
                         url=self.url, key=key)
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return Retriable(detail, url=self.url, key=key)
        return Fatal(detail, url=self.url, key=key)


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status if isinstance(status, int) else 0


def _is_aiohttp_error(exc: Exception) -> bool:
    import aiohttp

    return isinstance(exc, aiohttp.ClientError)
