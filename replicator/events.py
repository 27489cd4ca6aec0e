"""What flows between the stages: one `ChangeEvent` per row change, one `TransactionRecord`
per committed transaction.

Values keep their Postgres meaning (see `replicator.source.values`): `Decimal` for numeric,
aware `datetime` for timestamptz, `Interval`, `uuid.UUID`, `bytes`, lists for arrays, and the
exact text of json/jsonb. A TOASTed value that the server did not resend is *absent* from
`after` and named in `unchanged`; it is never a placeholder value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from replicator.position import ChangePosition, Lsn


class Op(enum.StrEnum):
    """Debezium's operation codes."""

    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    TRUNCATE = "t"
    READ = "r"  # a row of a snapshot


class Tier(enum.StrEnum):
    """How close the row's wedding is; names the Kafka topic and the sinks' flush interval."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


#: Consumption order under backlog: nearest wedding first.
TIER_ORDER: tuple[Tier, ...] = (Tier.CRITICAL, Tier.HIGH, Tier.NORMAL, Tier.LOW)

Row = Mapping[str, Any]


@dataclass(slots=True)
class ChangeEvent:
    """One row change at one position.

    `position` is `(commit_lsn, seq)`; `seq` counts the transaction's changes from 0. Snapshot
    rows (`op == READ`) carry the snapshot's LSN and their ordinal in the snapshot.
    """

    op: Op
    schema: str
    table: str
    position: ChangePosition
    commit_ts_us: int  # microseconds since the Unix epoch, UTC
    xid: int
    key: Row  # primary-key (replica identity) columns; empty for TRUNCATE
    before: Row | None = None
    after: Row | None = None
    unchanged: tuple[str, ...] = ()
    origin: str | None = None
    db: str = ""
    tier: Tier = Tier.LOW
    wedding_id: str | None = None

    @property
    def commit_lsn(self) -> Lsn:
        return self.position.commit_lsn

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(slots=True)
class TransactionRecord:
    """The boundary of one committed transaction: lets `verify` prove the archive has no gap."""

    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts_us: int
    xid: int
    counts: dict[str, int] = field(default_factory=dict)  # "schema.table" -> changes
    origin: str | None = None
    tier_counts: dict[str, int] = field(default_factory=dict)  # tier -> changes
    # "schema.table" -> content digest of its changes (`transport.avro.body_digest`, summed)
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
