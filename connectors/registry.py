"""Store URLs: the one place that maps a URL scheme to a store constructor.

    s3://bucket/prefix?endpoint=…&region=…     connectors.s3.S3Store
    az://container/prefix?endpoint=…           connectors.azure.AzureStore
    gs://bucket/prefix?endpoint=…              connectors.gcs.GcsStore
    file:///absolute/directory                 connectors.local.LocalStore
    mem://name/prefix                          connectors.memory.MemoryStore

The prefix is applied by the store: keys given to it, and keys it lists, are relative to it.
`s3`, `az` and `gs` also take `multipart_threshold` (bytes; larger objects are uploaded in
parts) and `page_size` (names per LIST request). Query values need no percent-encoding as
long as they hold no `&`: `?endpoint=http://127.0.0.1:9000&region=us-east-1` is fine.

Credentials never go in the URL; they come from the environment mapping passed in:

- s3: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), else `AWS_PROFILE`
  or botocore's standard chain (profile files, instance role). Region from `region=`, else
  `AWS_REGION` or `AWS_DEFAULT_REGION`.
- az: `AZURE_STORAGE_CONNECTION_STRING`, or `AZURE_STORAGE_ACCOUNT` + `AZURE_STORAGE_KEY`. An
  Azurite endpoint (`http://127.0.0.1:10000/devstoreaccount1`) with no key set uses Azurite's
  public development key, and only for the account `devstoreaccount1`.
- gs: with `endpoint=` (or `STORAGE_EMULATOR_HOST`), anonymous requests; else
  `GOOGLE_APPLICATION_CREDENTIALS` (a service-account key file) or Application Default
  Credentials. `GOOGLE_CLOUD_PROJECT` if set.

A malformed URL or an unknown scheme is a `ValueError` naming the URL (without credentials)
and what is accepted; credentials that are missing or half-set are `connectors.errors.Fatal`,
naming the variable to set. Opening a store does no I/O; wrap it in
`connectors.retry.RetryingStore` for the service.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from connectors.azure import AzureStore
from connectors.base import ObjectStore, join_prefix
from connectors.errors import Fatal, redact, safe_url
from connectors.gcs import GcsStore
from connectors.local import LocalStore
from connectors.memory import MemoryStore
from connectors.s3 import S3Store

__all__ = ["SCHEMES", "StoreUrl", "open_store", "parse_store_url"]

# Azurite's development account: a public, well-known key, not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_AZURITE_URL = f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}"

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,221}")
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_MEMORY_NAME = re.compile(r"[A-Za-z0-9._-]+")


class StoreUrl(NamedTuple):
    """A parsed store URL. `location` is the bucket, container or memory space ('' for
    `file`); `path` is the canonical prefix, or the absolute directory for `file`."""

    scheme: str
    location: str
    path: str
    options: dict[str, str]

    def display(self) -> str:
        """The URL as errors show it: no credentials, only the options that locate the store."""
        if self.scheme == "file":
            return Path(self.path).as_uri()
        query = "&".join(f"{name}={safe_url(self.options[name]) if name == 'endpoint' else value}"
                         for name, value in sorted(self.options.items())
                         if name in ("endpoint", "region"))
        return f"{self.scheme}://{self.location}/{self.path}" + (f"?{query}" if query else "")


def parse_store_url(url: str) -> StoreUrl:
    """Split and check *url*; `ValueError` naming the URL and the problem."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"store URL must be a non-empty string, got {url!r}; accepted: "
                         f"{_accepted()}")
    try:
        shown = safe_url(url)
        parts = urlsplit(url)
    except ValueError as exc:
        shown = redact(re.sub(r"//[^/?#@]*@", "//", url))  # without credentials
        raise ValueError(f"store URL {shown!r} is malformed ({exc}); accepted: {_accepted()}"
                         ) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported store URL {shown!r}: the scheme must be one of "
                         f"{_accepted()}")
    if "@" in parts.netloc:
        raise ValueError(f"store URL {shown!r} carries credentials; remove them and set them "
                         "in the environment instead (see connectors.registry)")
    if parts.fragment:
        raise ValueError(f"store URL {shown!r} has a '#' fragment, which means nothing here")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in SCHEMES[scheme].options:
            allowed = ", ".join(sorted(SCHEMES[scheme].options)) or "none"
            raise ValueError(f"store URL {shown!r} has an unknown option {name!r}; "
                             f"{scheme}:// accepts: {allowed}")
        if name in options:
            raise ValueError(f"store URL {shown!r} gives the option {name!r} twice")
        if not value:
            raise ValueError(f"store URL {shown!r} gives the option {name!r} no value")
        options[name] = value
    location, path = _split(scheme, unquote(parts.netloc), unquote(parts.path), shown)
    _check_options(options, shown)
    return StoreUrl(scheme, location, path, options)


def open_store(url: str, environ: Mapping[str, str]) -> ObjectStore:
    """The store *url* names, with credentials from *environ*. Does no I/O."""
    parsed = parse_store_url(url)
    return SCHEMES[parsed.scheme].opener(parsed, environ)


# --- per scheme ---------------------------------------------------------------------------


def _open_s3(url: StoreUrl, environ: Mapping[str, str]) -> ObjectStore:
    key_id = environ.get("AWS_ACCESS_KEY_ID") or None
    secret = environ.get("AWS_SECRET_ACCESS_KEY") or None
    if (key_id is None) != (secret is None):
        have, need = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key_id
                      else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise Fatal(f"{have} is set but {need} is not; set both, or neither to use a profile "
                    "or role", url=url.display())
    endpoint = url.options.get("endpoint")
    region = (url.options.get("region") or environ.get("AWS_REGION")
              or environ.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None))
    return S3Store(url.location, url.path, endpoint=endpoint, region=region,
                   access_key_id=key_id, secret_access_key=secret,
                   session_token=(environ.get("AWS_SESSION_TOKEN") or None) if key_id else None,
                   profile=None if key_id else environ.get("AWS_PROFILE") or None,
                   **_tuning(url))


def _open_azure(url: StoreUrl, environ: Mapping[str, str]) -> ObjectStore:
    endpoint = url.options.get("endpoint")
    account: str | None
    key: str | None
    sas: str | None = None
    if conn := environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        fields = _connection_string(conn, url)
        if fields.get("usedevelopmentstorage", "").lower() == "true":
            account, key = AZURITE_ACCOUNT, AZURITE_KEY
            endpoint = endpoint or _AZURITE_URL
        else:
            account, key = fields.get("accountname"), fields.get("accountkey")
            sas = fields.get("sharedaccesssignature")
            endpoint = endpoint or fields.get("blobendpoint") or (account and (
                f"{fields.get('defaultendpointsprotocol', 'https')}://{account}.blob."
                f"{fields.get('endpointsuffix', 'core.windows.net')}"))
            if not endpoint or not (key or sas):
                raise Fatal("AZURE_STORAGE_CONNECTION_STRING needs AccountName (or "
                            "BlobEndpoint) and AccountKey (or SharedAccessSignature)",
                            url=url.display())
    else:
        account = environ.get("AZURE_STORAGE_ACCOUNT") or None
        key = environ.get("AZURE_STORAGE_KEY") or None
        in_path = _azurite_account(endpoint)
        if key is None:
            if in_path == AZURITE_ACCOUNT and account in (None, AZURITE_ACCOUNT):
                account, key = AZURITE_ACCOUNT, AZURITE_KEY
            elif account:
                raise Fatal(f"AZURE_STORAGE_ACCOUNT is {account!r} but AZURE_STORAGE_KEY is not "
                            "set; set it, or AZURE_STORAGE_CONNECTION_STRING", url=url.display())
            else:
                raise Fatal("no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, or "
                            "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY", url=url.display())
        account = account or in_path
        if not account:
            raise Fatal("AZURE_STORAGE_KEY is set but AZURE_STORAGE_ACCOUNT is not; set it",
                        url=url.display())
        endpoint = endpoint or f"https://{account}.blob.core.windows.net"
    return AzureStore(url.location, url.path, account_url=endpoint,
                      account_name=account if key else None, account_key=key,
                      sas_token=None if key else (sas or "").lstrip("?"), **_tuning(url))


def _open_gcs(url: StoreUrl, environ: Mapping[str, str]) -> ObjectStore:
    endpoint = url.options.get("endpoint")
    if endpoint is None and (host := environ.get("STORAGE_EMULATOR_HOST")):
        endpoint = host if "://" in host else f"http://{host}"
    credentials = environ.get("GOOGLE_APPLICATION_CREDENTIALS") or None
    if endpoint is None and credentials is not None and not os.path.isfile(credentials):
        raise Fatal(f"GOOGLE_APPLICATION_CREDENTIALS is {credentials!r}, which is not a file; "
                    "point it at a service-account key file", url=url.display())
    return GcsStore(url.location, url.path, endpoint=endpoint,
                    credentials_file=None if endpoint else credentials,
                    project=environ.get("GOOGLE_CLOUD_PROJECT") or None, **_tuning(url))


def _open_local(url: StoreUrl, environ: Mapping[str, str]) -> ObjectStore:
    return LocalStore(url.path)


def _open_memory(url: StoreUrl, environ: Mapping[str, str]) -> ObjectStore:
    return MemoryStore(url.location, url.path)


@dataclass(frozen=True)
class _Scheme:
    opener: Callable[[StoreUrl, Mapping[str, str]], ObjectStore]
    options: frozenset[str]


_CLOUD = frozenset({"endpoint", "multipart_threshold", "page_size"})

#: Every supported URL scheme: its constructor and the query options it accepts.
SCHEMES: Mapping[str, _Scheme] = {
    "s3": _Scheme(_open_s3, _CLOUD | {"region"}),
    "az": _Scheme(_open_azure, _CLOUD),
    "gs": _Scheme(_open_gcs, _CLOUD),
    "file": _Scheme(_open_local, frozenset()),
    "mem": _Scheme(_open_memory, frozenset()),
}


# --- parsing helpers ----------------------------------------------------------------------


def _accepted() -> str:
    return ", ".join(f"{scheme}://" for scheme in SCHEMES)


def _split(scheme: str, netloc: str, path: str, shown: str) -> tuple[str, str]:
    """(location, path) of a URL, checked for its scheme."""
    if scheme == "file":
        if netloc not in ("", "localhost"):
            raise ValueError(f"store URL {shown!r} must be file:///absolute/path (three "
                             "slashes: a file URL has no host)")
        if not path.startswith("/") or "\x00" in path:
            raise ValueError(f"store URL {shown!r} must name an absolute directory")
        return "", os.path.normpath(path)
    pattern, what = {"s3": (_BUCKET, "S3 bucket"), "gs": (_BUCKET, "GCS bucket"),
                     "az": (_CONTAINER, "Azure container"),
                     "mem": (_MEMORY_NAME, "memory store name")}[scheme]
    if not netloc:
        raise ValueError(f"store URL {shown!r} has no {what}: write {scheme}://NAME/prefix")
    if pattern.fullmatch(netloc) is None:
        raise ValueError(f"store URL {shown!r}: {netloc!r} is not a valid {what} name")
    try:
        prefix = join_prefix(path)
    except ValueError:
        raise ValueError(f"store URL {shown!r} has a prefix with an empty, '.' or '..' "
                         "segment") from None
    return netloc, prefix


def _check_options(options: Mapping[str, str], shown: str) -> None:
    if endpoint := options.get("endpoint"):
        try:
            parts = urlsplit(endpoint)
        except ValueError as exc:
            raise ValueError(f"store URL {shown!r}: the endpoint is malformed ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"store URL {shown!r}: endpoint must be an http:// or https:// "
                             "URL with a host")
        try:
            parts.port  # noqa: B018 (parsing it is the check)
        except ValueError:
            raise ValueError(f"store URL {shown!r}: the endpoint's port must be a number in "
                             "0..65535") from None
    for name in ("multipart_threshold", "page_size"):
        if name in options and not (options[name].isdigit() and int(options[name]) > 0):
            raise ValueError(f"store URL {shown!r}: {name} must be a positive whole number, "
                             f"got {options[name]!r}")
    if int(options.get("page_size", "1")) > 1000:
        raise ValueError(f"store URL {shown!r}: page_size must be at most 1000")


def _tuning(url: StoreUrl) -> dict[str, Any]:
    return {name: int(url.options[name]) for name in ("multipart_threshold", "page_size")
            if name in url.options}


def _azurite_account(endpoint: str | None) -> str | None:
    """The account in an Azurite-style endpoint (`http://host:port/<account>`), if any."""
    if not endpoint:
        return None
    segment = urlsplit(endpoint).path.strip("/").split("/")[0]
    return segment or None


def _connection_string(conn: str, url: StoreUrl) -> dict[str, str]:
    """The fields of an Azure connection string, names lower-cased. Never echoes values."""
    fields: dict[str, str] = {}
    for part in conn.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise Fatal("AZURE_STORAGE_CONNECTION_STRING is malformed: expected "
                        "Name=value pairs separated by ';'", url=url.display())
        fields[name.strip().lower()] = value.strip()
    return fields
