"""Store URLs (`connectors.registry`): parsing, credentials from the environment, and errors.

Opening a store does no I/O, so none of this needs a service.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.azure import AzureStore
from connectors.errors import Fatal, NotFound, redact, safe_url
from connectors.gcs import GcsStore
from connectors.local import LocalStore
from connectors.memory import MemoryStore
from connectors.registry import AZURITE_ACCOUNT, StoreUrl, open_store, parse_store_url
from connectors.s3 import S3Store

AWS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG"}
AZURITE = "http://127.0.0.1:10000/devstoreaccount1"


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://wedsync-archive", StoreUrl("s3", "wedsync-archive", "", {})),
    ("s3://wedsync-archive/", StoreUrl("s3", "wedsync-archive", "", {})),
    ("s3://wedsync-archive/prod/eu", StoreUrl("s3", "wedsync-archive", "prod/eu/", {})),
    ("s3://wedsync-archive/prod/eu/", StoreUrl("s3", "wedsync-archive", "prod/eu/", {})),
    ("s3://b/p?endpoint=http://127.0.0.1:19000&region=us-east-1",
     StoreUrl("s3", "b", "p/", {"endpoint": "http://127.0.0.1:19000", "region": "us-east-1"})),
    ("s3://b/?endpoint=http%3A%2F%2Fminio%3A9000",
     StoreUrl("s3", "b", "", {"endpoint": "http://minio:9000"})),
    (f"az://backups/prod?endpoint={AZURITE}&page_size=50",
     StoreUrl("az", "backups", "prod/", {"endpoint": AZURITE, "page_size": "50"})),
    ("gs://wedsync/ns?multipart_threshold=1048576",
     StoreUrl("gs", "wedsync", "ns/", {"multipart_threshold": "1048576"})),
    ("file:///var/lib/wedsync/archive", StoreUrl("file", "", "/var/lib/wedsync/archive", {})),
    ("file://localhost/srv/archive/", StoreUrl("file", "", "/srv/archive", {})),
    ("mem://tests/ns", StoreUrl("mem", "tests", "ns/", {})),
    ("S3://b/x", StoreUrl("s3", "b", "x/", {})),
])
def test_store_urls_parse(url: str, expected: StoreUrl) -> None:
    assert parse_store_url(url) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("", "non-empty"),
    ("ftp://host/x", "scheme must be one of s3://, az://, gs://, file://, mem://"),
    ("wedsync-archive/prod", "scheme must be one of"),
    ("s3://", "has no S3 bucket"),
    ("s3:///prefix", "has no S3 bucket"),
    ("s3://bucket:443/x", "not a valid S3 bucket name"),
    ("az://Upper/x", "not a valid Azure container name"),
    ("az://ab/x", "not a valid Azure container name"),
    ("s3://b/a//c", "empty, '.' or '..' segment"),
    ("s3://b/a/../c", "empty, '.' or '..' segment"),
    ("s3://b/x#frag", "fragment"),
    ("s3://b/?bucket=x", "unknown option 'bucket'; s3:// accepts: endpoint, multipart_threshold, "
                         "page_size, region"),
    ("az://box/?region=eu", "unknown option 'region'"),
    ("file:///srv/x?page_size=3", "file:// accepts: none"),
    ("s3://b/?region=a&region=b", "twice"),
    ("s3://b/?region=", "no value"),
    ("s3://b/?endpoint=ftp://host", "endpoint must be an http:// or https:// URL"),
    ("s3://b/?endpoint=localhost:9000", "endpoint must be an http:// or https:// URL"),
    ("s3://b/?page_size=0", "page_size must be a positive whole number"),
    ("s3://b/?page_size=abc", "page_size must be a positive whole number"),
    ("s3://b/?page_size=1001", "at most 1000"),
    ("gs://b/?multipart_threshold=-5", "multipart_threshold must be a positive whole number"),
    ("file://relative/dir", "three slashes"),
    ("mem://", "has no memory store name"),
])
def test_malformed_urls_are_value_errors_naming_the_url(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_store_url(url)
    assert message in str(caught.value)
    assert safe_url(url) in str(caught.value)


def test_credentials_in_a_url_are_refused_and_never_echoed() -> None:
    with pytest.raises(ValueError) as caught:
        parse_store_url("s3://AKIDEXAMPLE:topsecret@bucket/prefix")
    assert "carries credentials" in str(caught.value)
    assert "topsecret" not in str(caught.value)
    assert "AKIDEXAMPLE" not in str(caught.value)


def test_open_store_maps_each_scheme_to_its_store(tmp_path: Path) -> None:
    assert isinstance(open_store("s3://b/p", AWS), S3Store)
    assert isinstance(open_store(f"az://box/p?endpoint={AZURITE}", {}), AzureStore)
    assert isinstance(open_store("gs://b/p?endpoint=http://127.0.0.1:4443", {}), GcsStore)
    assert isinstance(open_store(tmp_path.as_uri(), {}), LocalStore)
    assert isinstance(open_store("mem://urls-test/p", {}), MemoryStore)
    MemoryStore.discard("urls-test")


def test_a_store_url_shows_location_and_endpoint_but_no_credentials() -> None:
    env = {"AZURE_STORAGE_ACCOUNT": "wedsyncprod", "AZURE_STORAGE_KEY": "c2VjcmV0a2V5"}
    s3 = open_store("s3://b/prod/?endpoint=http://user:pw@127.0.0.1:19000&page_size=10", AWS)
    azure = open_store("az://box/prod", env)

    assert s3.url == "s3://b/prod/?endpoint=http://127.0.0.1:19000"
    assert azure.url == "az://box/prod/?endpoint=https://wedsyncprod.blob.core.windows.net"
    for text in (s3.url, repr(s3), azure.url, repr(azure)):
        assert "pw" not in text and "c2VjcmV0a2V5" not in text and "wJalr" not in text


# --- credentials --------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "missing"), [
    ({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE"}, "AWS_SECRET_ACCESS_KEY is not"),
    ({"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG"}, "AWS_ACCESS_KEY_ID is not"),
])
def test_half_set_aws_credentials_are_fatal_naming_the_missing_variable(
        env: dict[str, str], missing: str) -> None:
    with pytest.raises(Fatal, match=missing) as caught:
        open_store("s3://b/p", env)
    assert "wJalr" not in str(caught.value)
    assert "s3://b/p/" in str(caught.value)


def test_azurite_endpoint_without_a_key_uses_the_development_account_only() -> None:
    assert isinstance(open_store(f"az://box/?endpoint={AZURITE}", {}), AzureStore)
    with pytest.raises(Fatal, match="AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT "
                                    "and AZURE_STORAGE_KEY"):
        open_store("az://box/?endpoint=http://127.0.0.1:10000/otheraccount", {})
    with pytest.raises(Fatal, match="AZURE_STORAGE_KEY is not set"):
        open_store(f"az://box/?endpoint={AZURITE}", {"AZURE_STORAGE_ACCOUNT": "wedsyncprod"})
    assert AZURITE_ACCOUNT == "devstoreaccount1"


@pytest.mark.parametrize(("env", "message"), [
    ({}, "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY"),
    ({"AZURE_STORAGE_ACCOUNT": "wedsyncprod"}, "AZURE_STORAGE_KEY is not set"),
    ({"AZURE_STORAGE_KEY": "c2VjcmV0a2V5"}, "AZURE_STORAGE_ACCOUNT is not"),
    ({"AZURE_STORAGE_CONNECTION_STRING": "garbage-c2VjcmV0a2V5"}, "is malformed"),
    ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=wedsyncprod"}, "needs AccountName"),
])
def test_missing_azure_credentials_are_fatal_naming_what_to_set(env: dict[str, str],
                                                                message: str) -> None:
    with pytest.raises(Fatal, match=message) as caught:
        open_store("az://box/prod", env)
    assert "c2VjcmV0a2V5" not in str(caught.value)
    assert "az://box/prod/" in str(caught.value)


@pytest.mark.parametrize("conn", [
    "DefaultEndpointsProtocol=https;AccountName=wedsyncprod;AccountKey=c2VjcmV0a2V5;"
    "EndpointSuffix=core.windows.net",
    f"AccountName=devstoreaccount1;AccountKey=c2VjcmV0a2V5;BlobEndpoint={AZURITE};",
    "BlobEndpoint=https://wedsyncprod.blob.core.windows.net;SharedAccessSignature=sv=2024&sig=c2Vj",
    "UseDevelopmentStorage=true",
])
def test_azure_connection_strings_open_a_store(conn: str) -> None:
    store = open_store("az://box/prod", {"AZURE_STORAGE_CONNECTION_STRING": conn})
    assert isinstance(store, AzureStore)
    assert "c2Vj" not in store.url


def test_gcs_uses_the_emulator_host_variable_and_checks_the_credentials_file(
        tmp_path: Path) -> None:
    store = open_store("gs://b/p", {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"})
    assert store.url == "gs://b/p/?endpoint=http://127.0.0.1:4443"
    missing = tmp_path / "nope.json"
    with pytest.raises(Fatal, match=r"GOOGLE_APPLICATION_CREDENTIALS is .* which is not a file"):
        open_store("gs://b/p", {"GOOGLE_APPLICATION_CREDENTIALS": str(missing)})


# --- errors -------------------------------------------------------------------------------


def test_store_errors_name_the_store_and_the_key() -> None:
    error = NotFound("object does not exist", url="s3://b/ns/", key="segments/x.seg")
    assert str(error) == "object does not exist (store s3://b/ns/, key 'segments/x.seg')"
    assert (error.url, error.key, error.reason) == ("s3://b/ns/", "segments/x.seg",
                                                   "object does not exist")
    assert str(Fatal("bucket does not exist", url="s3://b/")) == (
        "bucket does not exist (store s3://b/)")


@pytest.mark.parametrize(("text", "secret"), [
    ("GET https://a.blob.core.windows.net/c/x?sv=2024&sig=abcDEF%2B123 failed", "abcDEF"),
    ("AccountName=a;AccountKey=c2VjcmV0a2V5;EndpointSuffix=core.windows.net", "c2VjcmV0a2V5"),
    ("https://user:hunter2@minio.local:9000/bucket", "hunter2"),
    ("PUT /b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKID%2F2024 refused", "deadbeef"),
    ("upload session /upload?upload_type=resumable&upload_id=ADPycdv1 expired", "ADPycdv1"),
])
def test_redact_removes_secrets_from_sdk_messages(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "***" in redact(text)


def test_safe_url_drops_user_information() -> None:
    assert safe_url("http://user:pw@127.0.0.1:9000/x?sig=abc") == "http://127.0.0.1:9000/x?sig=***"
