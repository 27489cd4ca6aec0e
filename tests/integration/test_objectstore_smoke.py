"""Put, get (with a range), list and delete on each object-store emulator, via its own SDK."""

from __future__ import annotations

import asyncio

import pytest

from replicator.devstack.objectstores import azurite_connection_string, gcs_client
from tests.conftest import StoreTarget, s3_client

PAYLOAD = b"segment-bytes:" + bytes(range(256)) * 4
KEYS = ["ns/segments/guest/0000000000000010-0000000000000020.seg",
        "ns/segments/guest/0000000000000021-0000000000000030.seg",
        "ns/transactions/0000000000000010-0000000000000030.seg"]


async def roundtrip_s3(t: StoreTarget) -> tuple[bytes, bytes, list[str], list[str]]:
    async with s3_client(t.endpoint) as c:
        for key in KEYS:
            await c.put_object(Bucket=t.bucket, Key=key, Body=PAYLOAD)
        whole = await (await c.get_object(Bucket=t.bucket, Key=KEYS[0]))["Body"].read()
        part = await (await c.get_object(Bucket=t.bucket, Key=KEYS[0], Range="bytes=14-17"))[
            "Body"].read()
        listed = [o["Key"] for o in (await c.list_objects_v2(
            Bucket=t.bucket, Prefix="ns/segments/"))["Contents"]]
        await c.delete_objects(Bucket=t.bucket, Delete={"Objects": [{"Key": k} for k in KEYS]})
        left = [o["Key"] for o in (await c.list_objects_v2(Bucket=t.bucket)).get("Contents", [])]
        with pytest.raises(c.exceptions.NoSuchKey):
            await c.get_object(Bucket=t.bucket, Key=KEYS[0])
    return whole, part, listed, left


async def roundtrip_azure(t: StoreTarget) -> tuple[bytes, bytes, list[str], list[str]]:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob.aio import BlobServiceClient

    async with BlobServiceClient.from_connection_string(
            azurite_connection_string(t.endpoint)) as svc:
        c = svc.get_container_client(t.bucket)
        for key in KEYS:
            await c.upload_blob(key, PAYLOAD)
        whole = await (await c.download_blob(KEYS[0])).readall()
        part = await (await c.download_blob(KEYS[0], offset=14, length=4)).readall()
        listed = [b.name async for b in c.list_blobs(name_starts_with="ns/segments/")]
        for key in KEYS:
            await c.delete_blob(key)
        left = [b.name async for b in c.list_blobs()]
        with pytest.raises(ResourceNotFoundError):
            await c.download_blob(KEYS[0])
    return whole, part, listed, left


async def roundtrip_gcs(t: StoreTarget) -> tuple[bytes, bytes, list[str], list[str]]:
    from google.api_core.exceptions import NotFound

    def run() -> tuple[bytes, bytes, list[str], list[str]]:
        bucket = gcs_client(t.endpoint).bucket(t.bucket)
        for key in KEYS:
            bucket.blob(key).upload_from_string(PAYLOAD)
        whole = bucket.blob(KEYS[0]).download_as_bytes()
        part = bucket.blob(KEYS[0]).download_as_bytes(start=14, end=17)
        listed = [b.name for b in bucket.list_blobs(prefix="ns/segments/")]
        for key in KEYS:
            bucket.blob(key).delete()
        left = [b.name for b in bucket.list_blobs()]
        with pytest.raises(NotFound):
            bucket.blob(KEYS[0]).download_as_bytes()
        return whole, part, listed, left

    return await asyncio.to_thread(run)


async def test_put_get_list_delete(store_target: StoreTarget) -> None:
    roundtrip = {"s3": roundtrip_s3, "azure": roundtrip_azure, "gcs": roundtrip_gcs}
    whole, part, listed, left = await roundtrip[store_target.kind](store_target)
    assert whole == PAYLOAD
    assert part == PAYLOAD[14:18]
    assert listed == KEYS[:2]  # sorted by name, so by position
    assert left == []
