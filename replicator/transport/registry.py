"""A small async client for the Confluent Schema Registry REST API.

Only what the producer and the consumers need:

- `register(subject, schema)`: `POST /subjects/{subject}/versions` -> the schema's global id
  (registering a schema the subject already has returns its existing id);
- `schema(schema_id)`: `GET /schemas/ids/{id}` -> the schema text.

Both are cached in memory: ids never change meaning in a registry, so the cache needs no
expiry. Subjects follow the TopicNameStrategy, `<topic>-value` (`subject_for`).

Errors are mapped at the boundary::

    RegistryError            any failure; `.status` is the HTTP status or None
    └── SchemaNotFound       404 for an id (error code 40403)

Transport failures (connection refused, timeout) are `RegistryError` with `status=None`,
raised from the aiohttp exception.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from replicator.errors import ReplicatorError
from replicator.transport.avro import EventCodec

__all__ = ["RegistryClient", "RegistryError", "SchemaNotFound", "adopt_schema_id", "subject_for"]

CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"


def subject_for(topic: str) -> str:
    """The value subject of *topic* under the TopicNameStrategy."""
    return f"{topic}-value"


class RegistryError(ReplicatorError):
    """The schema registry refused a request or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None,
                 error_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class SchemaNotFound(RegistryError):
    """No schema has the requested id."""


class RegistryClient:
    """Registers and fetches Avro schemas; an async context manager.

    *session* may be shared with other code; a session created here is closed by `close()`.
    """

    def __init__(self, url: str, *, session: aiohttp.ClientSession | None = None,
                 timeout_s: float = 10.0) -> None:
        self._url = url.rstrip("/")
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, str] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def register(self, subject: str, schema: str) -> int:
        """The id of *schema* (Avro JSON) under *subject*, registering it if needed."""
        cached = self._ids.get((subject, schema))
        if cached is not None:
            return cached
        body = await self._request("POST", f"/subjects/{quote(subject, safe='')}/versions",
                                   {"schema": schema, "schemaType": "AVRO"}, what=subject)
        schema_id = body.get("id")
        if not isinstance(schema_id, int):
            raise RegistryError(f"registry answered registering {subject} without an id")
        self._ids[subject, schema] = schema_id
        self._schemas.setdefault(schema_id, schema)
        return schema_id

    async def schema(self, schema_id: int) -> str:
        """The schema text registered under *schema_id*."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        body = await self._request("GET", f"/schemas/ids/{schema_id}", None,
                                   what=f"schema id {schema_id}")
        text = body.get("schema")
        if not isinstance(text, str):
            raise RegistryError(f"registry answered schema id {schema_id} without a schema")
        self._schemas[schema_id] = text
        return text

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None, *,
                       what: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        headers = {"Accept": CONTENT_TYPE}
        data = None
        if payload is not None:
            headers["Content-Type"] = CONTENT_TYPE
            data = json.dumps(payload)
        try:
            async with self._session.request(method, self._url + path, data=data,
                                             headers=headers, timeout=self._timeout) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The URL may hold credentials: name the operation, not the address.
            raise RegistryError(f"schema registry unreachable for {what}: "
                                f"{type(exc).__name__}") from exc
        try:
            body = json.loads(text) if text else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if status >= 300:
            code = body.get("error_code")
            message = body.get("message") or text[:200]
            cls = SchemaNotFound if status == 404 and method == "GET" else RegistryError
            raise cls(f"schema registry refused {what}: HTTP {status} ({code}): {message}",
                      status=status, error_code=code if isinstance(code, int) else None)
        return body


async def adopt_schema_id(client: RegistryClient, codec: EventCodec, schema_id: int) -> None:
    """Teach *codec* the schema behind *schema_id*, so it can decode Confluent-framed messages
    written with it; call it when decoding raises `UnknownSchemaError` with a `schema_id`."""
    if not codec.knows_schema_id(schema_id):
        codec.add_writer_schema(await client.schema(schema_id), schema_id=schema_id)
