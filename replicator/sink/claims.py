"""The sink's side of the claim check: a change too large for Kafka reaches the sink as a
reference, and the sink reads the change itself from the claims store before buffering it.

The capture (`transport.kafka.ClaimCheck`) writes a change whose message would exceed
`kafka.claim_check_bytes` as `claims/<commit lsn>-<seq>-<digest>.avro` in the claims store
(`kafka.claims_url`, by default the first destination's store), encrypted like every object,
and sends a reference instead: the usual headers plus `claim` (the object's name), and a
small JSON value (`claim`, `store`, `size`, `sha256`; see docs/EVENTS.md). `ClaimResolver`
turns such a record back into the message value the capture would have sent, checked against
the reference's SHA-256, so segments always hold the full change and replay never sees a
reference.

A claims store that does not answer is retried (capped, jittered backoff) for as long as the
sink runs: the record is not buffered until its change is read, so nothing after it is
committed either. A claim that is missing or does not match its reference stops the sink
with `ClaimUnavailable` (an operator's problem: the change cannot be archived as sent).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from connectors.base import ObjectStore
from connectors.errors import NotFound, StoreError
from connectors.registry import open_store
from connectors.retry import RetryingStore
from replicator.crypto import CryptoError, Keyring, decrypt
from replicator.errors import OperatorError
from replicator.transport.kafka import CLAIM_HEADER

__all__ = ["ClaimResolver", "ClaimUnavailable"]

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0


class ClaimUnavailable(OperatorError):
    """A referenced claim is missing, unreadable or not what its reference says."""


def claim_of(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    """The claim's object name when the record is a reference, else None."""
    for name, value in headers or ():
        if name == CLAIM_HEADER:
            return value.decode()
    return None


class ClaimResolver:
    """Reads claimed changes from the claims store at *url* (opened on first use; *store*
    when the claims live in the sink's own store)."""

    def __init__(self, url: str | None, keyring: Keyring, *, store: ObjectStore | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.url = url
        self._keyring = keyring
        self._store = store
        self._owned: ObjectStore | None = None
        self._environ = environ
        self.resolved = 0

    async def value_of(self, record: Any) -> bytes:
        """The message value of *record*, read from the claims store if it is a reference."""
        claim = claim_of(record.headers)
        if claim is None:
            return bytes(record.value)
        where = f"{record.topic}/{record.partition}@{record.offset}"
        reference = self._reference(record.value, claim, where)
        sealed = await self._fetch(claim, where)
        try:
            value = await asyncio.to_thread(decrypt, sealed, claim, self._keyring)
        except CryptoError as exc:
            raise ClaimUnavailable(f"claim {claim} (referenced by {where}) cannot be "
                                   f"decrypted: {exc}") from exc
        digest = await asyncio.to_thread(lambda: hashlib.sha256(value).hexdigest())
        if digest != reference.get("sha256"):
            raise ClaimUnavailable(f"claim {claim} (referenced by {where}) does not match the "
                                   "SHA-256 of its reference")
        self.resolved += 1
        return value

    @staticmethod
    def _reference(value: bytes | None, claim: str, where: str) -> dict[str, Any]:
        try:
            reference = json.loads(value or b"")
        except ValueError:
            reference = None
        if not isinstance(reference, dict) or reference.get("claim") != claim:
            raise ClaimUnavailable(f"record {where} names claim {claim} in its header but its "
                                   "value is not a reference to it")
        return reference

    def _open(self) -> ObjectStore:
        if self._store is None:
            if self.url is None:
                raise ClaimUnavailable("a record refers to a claim, but no claims store is "
                                       "configured: set kafka.claims_url to the capture's")
            self._owned = RetryingStore(open_store(
                self.url, os.environ if self._environ is None else self._environ))
            self._store = self._owned
        return self._store

    async def _fetch(self, claim: str, where: str) -> bytes:
        delay, warned = 0.5, False
        while True:
            try:
                return await self._open().get(claim)
            except NotFound as exc:
                raise ClaimUnavailable(f"claim {claim} (referenced by {where}) is missing from "
                                       f"{self.url}: that change cannot be archived") from exc
            except (StoreError, OSError) as exc:
                if isinstance(exc, OperatorError):
                    raise ClaimUnavailable(f"claims store {self.url}: {exc}") from exc
                if not warned:
                    log.warning("cannot read claim %s from %s (%s); retrying", claim,
                                self.url, exc)
                    warned = True
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(RETRY_MAX_S, delay * 2)

    async def close(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.close()
