"""What several benchmarks set up the same way."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import Stack


async def postgres_and_kafka(prefix: str) -> tuple[str, str, str, Path]:
    """The local stack's PostgreSQL 15 and Kafka started (if they are not), and what one run
    uses: (the server's admin DSN, Kafka's bootstrap address, a fresh name starting with
    *prefix* for its database, slot and topics, a new work folder holding an empty
    `archive` folder)."""
    stack = Stack(StackSettings.from_env(os.environ))
    await stack.up(["pg15", "kafka"])
    work = Path(tempfile.mkdtemp(prefix=f"wedsync-{prefix}-"))
    (work / "archive").mkdir()
    return (stack.services["pg15"].address(), stack.services["kafka"].address(),
            prefix + uuid.uuid4().hex[:10], work)


def print_result(result: dict[str, Any], as_json: bool, keys: tuple[str, ...]) -> None:
    """The result: one JSON object on the last line with *as_json*, else *keys* one a line."""
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key in keys:
            print(f"{key}: {result[key]}")
