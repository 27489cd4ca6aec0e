"""What flows between the stages: one `ChangeEvent` per row change, one `TransactionRecord`
per committed transaction.

Values keep their Postgres meaning (see `replicator.source.values`): `Decimal` for numeric,
aware `datetime` for timestamptz, `Interval`, `uuid.UUID`, `bytes`, lists for arrays, and the
exact text of json/jsonb. A TOASTed value that the server did not resend is *absent* from
`after` and named in `unchanged`; it is never a placeholder value.

A table is named by its (schema, table) pair; where one text is needed (configuration,
Kafka keys and headers, transaction records, archive object names) it is `join_qualified`'s
form: `schema.table`, or both parts as SQL quoted identifiers (`"my.schema"."v1.2"`) when
either holds a dot or a double quote, so every text splits back into one pair
(`split_qualified`). Names are exact, never case-folded: `public.Guest List` is the table
`"Guest List"`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

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
#: A tier by its name, without an Enum call (hot paths).
TIER_BY_NAME: dict[str, Tier] = {tier.value: tier for tier in TIER_ORDER}

Row = Mapping[str, Any]

_PART = r'"(?:[^"]|"")+"|[^".]+'
_QUALIFIED = re.compile(rf"({_PART})(?:\.({_PART}))?")


def _quote(part: str) -> str:
    return '"' + part.replace('"', '""') + '"'


def _unquote(part: str) -> str:
    return part[1:-1].replace('""', '"') if part.startswith('"') else part


#: The schemas a replay into Postgres stages its tables in (`replay.targets`): never captured.
RESTORE_STAGING_PREFIX: Final = "replicator_restore_"


def is_restore_staging(schema: str) -> bool:
    """Whether *schema* is a replay's staging schema, whose tables capture leaves out."""
    return schema.startswith(RESTORE_STAGING_PREFIX)


def join_qualified(schema: str, table: str) -> str:
    """The text form of a table's name: `schema.table`, or both parts quoted as SQL
    identifiers (`"my.schema"."v1.2"`, `"public"."we""ird"`) when either holds a dot or a
    double quote."""
    if "." in schema or '"' in schema or "." in table or '"' in table:
        return f"{_quote(schema)}.{_quote(table)}"
    return f"{schema}.{table}"


def split_qualified(text: str, default_schema: str | None = None) -> tuple[str, str]:
    """The (schema, table) pair of a text `join_qualified` writes. Also takes a part quoted
    where it need not be (`public."guests"`) and, given *default_schema*, a table name alone.
    Raises ValueError naming the text for anything else."""
    match = _QUALIFIED.fullmatch(text)
    if match is None or (match[2] is None and default_schema is None):
        raise ValueError(
            f"{text!r} is not a table name like 'public.guests' (a part holding a dot or a "
            f"double quote is quoted as in SQL: '\"my.schema\".\"v1.2\"')")
    if match[2] is None:
        assert default_schema is not None
        return default_schema, _unquote(match[1])
    return _unquote(match[1]), _unquote(match[2])


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
    #: `join_qualified(schema, table)`, filled in by whoever makes many events of one table
    #: (the capture's assembler and snapshot); empty: worked out on demand.
    qualified: str = field(default="", compare=False, repr=False)

    @property
    def commit_lsn(self) -> Lsn:
        return self.position.commit_lsn

    @property
    def qualified_table(self) -> str:
        return self.qualified or join_qualified(self.schema, self.table)


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
    # "schema.table" -> content digest of its changes (`transport.avro.content_digest`, summed)
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
