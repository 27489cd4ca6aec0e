"""The errors every object store raises, whatever its backend.

Each connector turns its SDK's exceptions into this small tree at the boundary, raised `from`
the original, so callers decide by kind and never import an SDK to catch something:

    StoreError              anything that went wrong talking to a store (a ReplicatorError)
    ├── NotFound            get/stat of a key that does not exist
    ├── AlreadyExists       put of a key that exists (writes are create-only)
    ├── Retriable           the same call may succeed later: network, timeout, throttling, 5xx
    │                       (also a TransientError)
    └── Fatal               it will not succeed until a person acts: credentials, permissions,
                            bad configuration, a missing bucket/container/directory (also an
                            OperatorError: a command stopped by it exits 2)

Only `Retriable` is retried (`connectors.retry`). A message names the store by its display URL,
which never holds credentials, and the key when there is one; text taken from an SDK
exception goes through `redact()` first, so a signature or account key cannot leak into a
log line.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from replicator.errors import OperatorError, ReplicatorError, TransientError

__all__ = [
    "AlreadyExists",
    "Fatal",
    "NotFound",
    "Retriable",
    "StoreError",
    "describe",
    "redact",
    "safe_url",
    "translated",
]

# Names whose values are secrets wherever they appear: query strings (SAS tokens, presigned
# URLs), connection strings, header dumps in SDK messages.
_SECRET = re.compile(
    r"(?i)(\b(?:accountkey|sharedaccesssignature|sig|signature|x-amz-signature|"
    r"x-amz-credential|x-amz-security-token|access_token|upload_id|password|secret|token|key)\s*[=:]\s*)"
    r"([^&;,\s'\"]+)"
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")
_MAX_DETAIL = 300


class StoreError(ReplicatorError):
    """A store operation failed. `url` is the store's display URL, `key` the object's key."""

    def __init__(self, message: str, *, url: str, key: str | None = None) -> None:
        self.reason = message
        self.url = url
        self.key = key
        where = f"store {url}" if key is None else f"store {url}, key {key!r}"
        super().__init__(f"{message} ({where})")


class NotFound(StoreError):
    """The key does not exist."""


class AlreadyExists(StoreError):
    """The key exists already; stores never overwrite."""


class Retriable(StoreError, TransientError):
    """A transient failure: the same call may succeed if tried again later."""


class Fatal(StoreError, OperatorError):
    """A failure that retrying cannot fix: authentication, permissions, configuration."""


def redact(text: str) -> str:
    """*text* with credentials in URLs and `name=value` secrets replaced by `***`, shortened."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _SECRET.sub(r"\1***", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def describe(exc: BaseException) -> str:
    """A one-line, redacted summary of an SDK exception for our messages."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def safe_url(url: str) -> str:
    """*url* without user information or query values that look like secrets."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, redact(parts.query), ""))


@contextlib.contextmanager
def translated(translate: Callable[[Exception], StoreError]) -> Iterator[None]:
    """The boundary: inside it, any non-`StoreError` exception becomes `translate(exc)`.

    The new error is raised `from` the original, so the SDK's traceback stays attached.
    `BaseException`s (`CancelledError`, `KeyboardInterrupt`) pass through untouched.
    """
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        raise translate(exc) from exc
